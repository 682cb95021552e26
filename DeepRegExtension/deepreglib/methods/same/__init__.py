"""The ``same`` method: SAME (anatomical embeddings).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import LearnedInitializer, MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="same",
        title="SAME (anatomical embeddings)",
        description="Self-supervised anatomical embeddings match points between the scans: "
                    "SAM-affine, then SAM-coarse, then SAM-VoxelMorph. Robust to large offsets; "
                    "each step can be run alone (option steps=affine,coarse,voxelmorph).",
        kind="deformable",
        weights="same",
        implementation=f"{__name__}.method:SAMEMethod",
        outputs=("displacement", "same_affine", "same_coarse_displacement", "same_affine_fixed_points",
                 "same_affine_moving_points", "same_coarse_fixed_points", "same_coarse_moving_points",
                 "embedding_similarity", "body_mask"),
        expected_seconds={"cpu": 18.0, "cuda": 1.5},
        input_note="Unaligned or aligned pairs of the same body region; option "
                   "fit=lstsq|ransac|irls for SAM-affine.",
        reference="Liu et al., SAME: Deformable Image Registration based on Self-supervised Anatomical "
                  "Embeddings, MICCAI 2021",
    ),
    networks={
        "SAMNet": f"{__name__}.network:SAMNet",
        "SAMVoxelMorph": f"{__name__}.network_voxelmorph:SAMVoxelMorph",
    },
    recipes={"sam": f"{__name__}.training:SAM", "same_vxm": f"{__name__}.training:SAME_VXM"},
    initializers={"same-affine": LearnedInitializer(f"{__name__}.method:same_affine_initializer",
                                                    weights=("sam", "same"), refined_by="affine",
                                                    label="SAM-affine (anatomical matches)",
                                                    refined_label="SAM-affine, then affine")},
    order=70,
)
