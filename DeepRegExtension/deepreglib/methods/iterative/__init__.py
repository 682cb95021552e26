"""The ``iterative`` method: Iterative diffeomorphic (no network).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="iterative",
        title="Iterative diffeomorphic (no network)",
        description="Classic multi-resolution optimisation of a stationary velocity field (local NCC "
                    "plus smoothness) on the given pair; needs no trained weights.",
        kind="deformable",
        weights=None,
        implementation=f"{__name__}.method:IterativeMethod",
        outputs=("displacement", "inverse_displacement", "velocity"),
        expected_seconds={"cpu": 25.0, "cuda": 3.0},
        input_note="Same-modality 3D pair, roughly aligned (use --init affine otherwise).",
        supports_refine=False,
        reference="instance optimisation as in Learn2Reg baselines",
    ),
    order=20,
)
