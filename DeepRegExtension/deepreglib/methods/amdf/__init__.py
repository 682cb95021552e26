"""The ``amdf`` method: Attention-guided multi-scale fusion.

Its one :class:`~deepreglib.methods.spec.MethodSpec`, plain data: nothing here imports torch;
the registry imports the named modules when they are used."""
from ..spec import MethodInfo, MethodSpec

SPEC = MethodSpec(
    info=MethodInfo(
        name="amdf",
        title="Attention-guided multi-scale fusion",
        description="A segmentation net masks each image to its region of interest; a U-Net predicts "
                    "fields at 4 scales that are fused coarse to fine by learned attention weights.",
        kind="deformable",
        weights="amdf",
        implementation=f"{__name__}.method:AmdfMethod",
        outputs=("displacement", "roi_mask_fixed", "roi_mask_moving", "fusion_weight_s1", "fusion_weight_s2",
                 "fusion_weight_s4", "fusion_weight_s8", "field_s1_mm", "field_s2_mm", "field_s4_mm",
                 "field_s8_mm"),
        expected_seconds={"cpu": 21.0, "cuda": 1.0},
        input_note="Same-modality 3D pair, roughly aligned (use --init affine otherwise).",
        reference="Attention-guided fusion of multi-scale deformation fields (DFSA)",
    ),
    networks={
        "AMDF": f"{__name__}.network:AMDF",
        "RoiSegmentationUNet": f"{__name__}.network:RoiSegmentationUNet",
        "LabelAutoEncoder": f"{__name__}.network:LabelAutoEncoder",
    },
    recipes={
        "amdf_seg": f"{__name__}.training:AMDF_SEG",
        "amdf_ae": f"{__name__}.training:AMDF_AE",
        "amdf": f"{__name__}.training:AMDF_RECIPE",
    },
    order=40,
)
