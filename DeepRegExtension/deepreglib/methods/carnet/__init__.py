"""The ``carnet`` method: CAR-Net (co-attention, diffeomorphic).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="carnet",
        title="CAR-Net (co-attention, diffeomorphic)",
        description="Co-attention between fixed and moving features guides a probabilistic U-Net that "
                    "predicts a stationary velocity field (mean used at inference), integrated into a "
                    "diffeomorphism. Shows where each image attended and how certain the field is.",
        kind="deformable",
        weights="carnet",
        implementation=f"{__name__}.method:CarNetMethod",
        outputs=("displacement", "inverse_displacement", "velocity", "attention_fixed", "attention_moving",
                 "uncertainty_mm", "query_attention"),
        expected_seconds={"cpu": 12.0, "cuda": 1.0},
        input_note="Same-modality 3D pair, roughly (affinely) aligned: use --init affine otherwise. "
                   "Option query_point=x,y,z (LPS mm) adds the attention row of that fixed point.",
        reference="Shi et al., CAR-Net: co-attention guided diffeomorphic registration (2022)",
    ),
    networks={"CarNet": f"{__name__}.network:CarNet"},
    recipes={"carnet": f"{__name__}.training:CARNET"},
    order=30,
)
