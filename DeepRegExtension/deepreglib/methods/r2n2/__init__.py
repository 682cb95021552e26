"""The ``r2n2`` method: R2N2 (recurrent local deformations).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="r2n2",
        title="R2N2 (recurrent local deformations)",
        description="A recurrent network adds one local Gaussian deformation at a time (centre, "
                    "oriented extent, weight), stopping when the similarity no longer improves; the "
                    "sequence can be played back step by step.",
        kind="deformable",
        weights="r2n2",
        implementation=f"{__name__}.method:R2N2Method",
        outputs=("displacement", "r2n2_deformations", "r2n2_steps"),
        expected_seconds={"cpu": 8.0, "cuda": 1.5},
        input_note="Same-modality 3D pair, roughly aligned; options max_steps, stop_threshold.",
        reference="Sandkühler et al., Recurrent Registration Neural Networks for Deformable Image "
                  "Registration, NeurIPS 2019 (extended to 3D)",
    ),
    networks={"R2N2": f"{__name__}.network:R2N2"},
    recipes={"r2n2": f"{__name__}.training:R2N2_RECIPE"},
    order=50,
)
