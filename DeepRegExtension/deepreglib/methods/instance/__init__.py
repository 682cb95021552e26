"""The ``instance`` method: fast instance optimisation (no network).

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="instance",
        title="Fast instance optimisation (no network)",
        description="Coarse-to-fine optimisation of a smooth displacement field on the given pair "
                    "(local NCC from running sums, on the foreground box, each level stopping when "
                    "it converges; folding repaired), and on data finer than the network grid a last, "
                    "sparse level at the data's resolution (the strongest edges only). Images of "
                    "different contrasts (--contrast different) get a discrete search over "
                    "displacements of MIND-SSC features with a coupled convex smoothing instead "
                    "(ConvexAdam's first stage). The engine of the balanced and accurate presets.",
        kind="deformable",
        weights=None,
        implementation=f"{__name__}.method:InstanceMethod",
        outputs=("displacement",),
        expected_seconds={"cpu": 15.0, "cuda": 1.0},
        input_note="3D pair, roughly aligned (--init auto does it; for a field of view under 60 mm "
                   "of another modality, such as ultrasound, it matches the boxes' centres).",
        supports_refine=False,
        reference="ConvexAdam (Siebert, Hansen and Heinrich 2021); greedy (Yushkevich et al.)",
    ),
    order=15,
)
