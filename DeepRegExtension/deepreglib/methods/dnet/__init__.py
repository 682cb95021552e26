"""The ``dnet`` method: D-Net (rigid, any rotation).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import LearnedInitializer, MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="dnet",
        title="D-Net (rigid, any rotation)",
        description="Siamese encoder-decoder with mutual non-local attention regresses a rigid pose "
                    "(6D rotation + translation) in one pass, over the full rotation range. Also "
                    "available as --init dnet in front of any deformable method.",
        kind="rigid",
        weights="dnet",
        implementation=f"{__name__}.method:DNetMethod",
        outputs=("transform", "mutual_attention"),
        expected_seconds={"cpu": 1.0, "cuda": 0.2},
        input_note="Same subject, any pose (intra-subject rigid). Option query_point=x,y,z for the map.",
        supports_refine=False,
        reference="D-Net: Siamese encoder-decoder with mutual non-local links for rigid registration",
    ),
    networks={"DNet": f"{__name__}.network:DNet"},
    recipes={"dnet": f"{__name__}.training:DNET"},
    initializers={"dnet": LearnedInitializer(f"{__name__}.method:dnet_initializer", weights=("dnet",),
                                             refined_by="rigid", label="D-Net (any rotation, coarse)",
                                             refined_label="D-Net, then rigid (any rotation, precise)")},
    order=60,
)
