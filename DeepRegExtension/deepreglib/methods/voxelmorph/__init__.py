"""The ``voxelmorph`` method: VoxelMorph (diffeomorphic).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="voxelmorph",
        title="VoxelMorph (diffeomorphic)",
        description="U-Net predicting a stationary velocity field, integrated by scaling and squaring "
                    "into a diffeomorphic deformation. The baseline the attention methods extend.",
        kind="deformable",
        weights="voxelmorph",
        implementation=f"{__name__}.method:VoxelMorphMethod",
        outputs=("displacement", "inverse_displacement", "velocity"),
        expected_seconds={"cpu": 8.0, "cuda": 0.5},
        input_note="Same-modality 3D pair, roughly (affinely) aligned: use --init affine otherwise.",
        reference="Dalca et al., MICCAI 2018 / MedIA 2019; Balakrishnan et al., TMI 2019",
    ),
    networks={"VoxelMorph": f"{__name__}.network:VoxelMorph"},
    recipes={"voxelmorph": f"{__name__}.training:VOXELMORPH"},
    order=10,
)
