"""Both modules' parameter nodes, built by Slicer's real ``parameterNodeWrapper`` (5.8.1 and
5.10.0, from ``../shared/slicer``) on a real ``vtkMRMLScriptedModuleNode`` (``slicer-core``):
defaults, every parameter set and read back (``None`` for each optional node), and a scene saved
to ``.mrml`` and read back with the parameters intact.

Slicer's wrapper writes every default when the node is wrapped, so a field it cannot serialize
(e.g. a union of node types without ``None``) fails the module's ``setup()`` in the application.
"""
import itertools

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (Slicer's MRML classes) is not installed", allow_module_level=True)

import slicer_layer  # noqa: E402

_counter = itertools.count()

#: the value set for each parameter: a node class (a new node of it), or a plain value
VALUES = {
    "DeepRegistration": {
        "fixedVolume": "vtkMRMLScalarVolumeNode", "movingVolume": "vtkMRMLScalarVolumeNode",
        "preset": "custom", "differentContrast": True, "method": "carnet", "device": "cuda:1", "refineSteps": 50, "initialization": "affine",
        "fixedMask": "vtkMRMLSegmentationNode", "movingMask": "vtkMRMLLabelMapVolumeNode",
        "fixedLandmarks": "vtkMRMLMarkupsFiducialNode", "movingLandmarks": "vtkMRMLMarkupsFiducialNode",
        "initialTransform": "vtkMRMLLinearTransformNode", "queryPoint": "vtkMRMLMarkupsFiducialNode",
        "methodOptions": "uncertainty_samples=4", "outputVolume": "vtkMRMLScalarVolumeNode",
        "outputTransform": "vtkMRMLGridTransformNode", "createJacobian": False, "createInverse": False,
        "showMethodOutputs": False, "overlayOpacity": 0.25, "keepTemporaryFiles": True,
    },
    "DeformationQA": {
        "transformNode": "vtkMRMLGridTransformNode", "referenceVolume": "vtkMRMLScalarVolumeNode",
        "inverseTransform": "vtkMRMLGridTransformNode", "fixedVolume": "vtkMRMLScalarVolumeNode",
        "warpedVolume": "vtkMRMLScalarVolumeNode", "fixedLandmarks": "vtkMRMLMarkupsFiducialNode",
        "movingLandmarks": "vtkMRMLMarkupsFiducialNode", "fixedSegmentation": "vtkMRMLLabelMapVolumeNode",
        "warpedSegmentation": "vtkMRMLSegmentationNode", "reportTable": "vtkMRMLTableNode",
        "includeScreenshot": False,
    },
}
DEFAULTS = {
    "DeepRegistration": {"device": "auto", "refineSteps": 0, "createJacobian": True, "differentContrast": False,
                         "overlayOpacity": 0.5, "keepTemporaryFiles": False,
                         # a new node is the default preset, its values in the Advanced fields
                         "preset": "balanced", "initialization": "auto", "method": "instance",
                         "methodOptions": "schedule=balanced"},
    "DeformationQA": {"includeScreenshot": True},
}
PARAMETER_CLASS = {"DeepRegistration": "DeepRegistrationParameterNode",
                   "DeformationQA": "DeformationQAParameterNode"}


def _parameter_class(release, module_name):
    module = slicer_layer.load_module_file(module_name, f"{module_name}_{release.replace('.', '_')}_{next(_counter)}")
    assert module._HAS_PARAMETER_WRAPPER, "the module did not see Slicer's parameterNodeWrapper"
    return getattr(module, PARAMETER_CLASS[module_name])


def _value(scene, spec):
    if isinstance(spec, str) and spec.startswith("vtkMRML"):
        return scene.AddNewNodeByClass(spec, scene.GenerateUniqueName(spec))
    return spec


def _same(a, b):
    if hasattr(a, "GetID") or hasattr(b, "GetID"):
        return a is not None and b is not None and a.GetID() == b.GetID()
    return a == b


@pytest.mark.parametrize("module_name", sorted(VALUES))
@pytest.mark.parametrize("release", slicer_layer.RELEASES)
def test_parameter_node_built_by_slicers_wrapper(release, module_name, tmp_path):
    if not slicer_layer.available(release):
        pytest.skip(f"Slicer's Python layer {release} is not in {slicer_layer.SHARED_SLICER}")
    with slicer_layer.slicer_python_layer(release):
        cls = _parameter_class(release, module_name)
        scene = slicer.vtkMRMLScene()
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", f"{module_name}Parameters")
        p = cls(node)  # writes every default: fails on a field the wrapper cannot serialize

        for name, expected in DEFAULTS[module_name].items():
            assert getattr(p, name) == expected, name
        optional_nodes = [n for n, spec in VALUES[module_name].items() if str(spec).startswith("vtkMRML")]
        for name in optional_nodes:
            assert getattr(p, name) is None, f"{name} should start unset"

        values = {name: _value(scene, spec) for name, spec in VALUES[module_name].items()}
        for name, value in values.items():
            setattr(p, name, value)
            assert _same(getattr(p, name), value), name
        for name in optional_nodes:  # every optional node can be cleared again
            setattr(p, name, None)
            assert getattr(p, name) is None, name
            setattr(p, name, values[name])

        path = tmp_path / "scene.mrml"
        scene.SetURL(str(path))
        assert scene.Commit(), "the scene could not be saved"
        reloaded = slicer.vtkMRMLScene()
        reloaded.SetURL(str(path))
        assert reloaded.Connect(), "the saved scene could not be read"
        again = cls(reloaded.GetFirstNodeByName(f"{module_name}Parameters"))
        for name, value in values.items():
            got = getattr(again, name)
            if hasattr(value, "GetID"):
                assert got is not None and got.GetID() == value.GetID() and got.GetScene() is reloaded, name
            else:
                assert got == value, name


@pytest.mark.parametrize("release", slicer_layer.RELEASES)
def test_new_node_is_the_registrys_default_preset(release):
    """The defaults above are the registry's: ``DEFAULT_PRESET`` and its alignment, method and
    options, so a new node runs that preset (it is not turned into Custom on first sight)."""
    if not slicer_layer.available(release):
        pytest.skip(f"Slicer's Python layer {release} is not in {slicer_layer.SHARED_SLICER}")
    from deepreglib.methods.presets import DEFAULT_PRESET, PRESETS
    with slicer_layer.slicer_python_layer(release):
        module = slicer_layer.load_module_file("DeepRegistration", f"DeepRegistration_preset_{next(_counter)}")
        scene = slicer.vtkMRMLScene()
        p = module.DeepRegistrationParameterNode(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
        assert p.preset == DEFAULT_PRESET == "balanced"
        assert p.initialization == PRESETS[DEFAULT_PRESET].init == "auto"
        assert p.method == PRESETS[DEFAULT_PRESET].method
        assert module.DeepRegistrationLogic.effectivePreset(p) == DEFAULT_PRESET
        p.refineSteps = 20  # an Advanced value of its own: the run is a custom one
        assert module.DeepRegistrationLogic.effectivePreset(p) == "custom"


@pytest.mark.parametrize("release", slicer_layer.RELEASES)
def test_refine_steps_range_is_enforced_by_the_wrapper(release):
    if not slicer_layer.available(release):
        pytest.skip(f"Slicer's Python layer {release} is not in {slicer_layer.SHARED_SLICER}")
    with slicer_layer.slicer_python_layer(release):
        cls = _parameter_class(release, "DeepRegistration")
        scene = slicer.vtkMRMLScene()
        p = cls(scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
        with pytest.raises(ValueError):
            p.refineSteps = -1
        with pytest.raises(ValueError):
            p.overlayOpacity = 1.5
