"""The extension's packaging files say what the Extensions Index and Slicer's build need: the
``EXTENSION_*`` metadata with ``PyTorch`` as a dependency, both modules built with
``slicerMacroBuildScriptedModule`` (every helper file installed) and their self-tests
registered with ``slicer_add_python_unittest``; the ``.s4ext`` and index JSON agree."""
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "DeepRegExtension"


def _cmake(path: Path) -> str:
    """The file without its comment lines (a ``#`` inside a value, as in a URL, stays)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def _set(text: str, name: str) -> str:
    m = re.search(rf'set\({name}\s+"([^"]*)"\)', text)
    assert m, f"{name} is not set"
    return m.group(1)


def test_extension_metadata():
    text = _cmake(ROOT / "CMakeLists.txt")
    assert _set(text, "EXTENSION_CATEGORY") == "Registration"
    assert _set(text, "EXTENSION_DEPENDS") == "PyTorch"
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert _set(text, name).strip(), name
    assert _set(text, "EXTENSION_ICONURL").endswith("Resources/Icons/DeepRegExtension.png")
    assert (ROOT / "Resources" / "Icons" / "DeepRegExtension.png").is_file()
    assert "add_subdirectory(DeepRegExtension)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text


def test_s4ext_and_index_entry_agree_with_cmake():
    s4ext = {}
    for line in (ROOT / "DeepRegExtension.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value.strip()
    entry = json.loads((ROOT / "DeepRegExtension.json").read_text())
    assert s4ext["depends"] == "PyTorch" and entry["build_dependencies"] == ["PyTorch"]
    assert s4ext["category"] == entry["category"] == "Registration"
    assert s4ext["scmurl"] == entry["scm_url"] and s4ext["scm"] == "git"
    cmake = _cmake(ROOT / "CMakeLists.txt")
    assert s4ext["iconurl"] == _set(cmake, "EXTENSION_ICONURL")
    assert s4ext["homepage"] == _set(cmake, "EXTENSION_HOMEPAGE")
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]


def test_both_modules_are_built_and_their_selftests_registered():
    text = _cmake(MODULE_DIR / "CMakeLists.txt")
    built = re.findall(r"set\(MODULE_NAME (\w+)\)\s*slicerMacroBuildScriptedModule\(", text)
    assert built == ["DeepRegistration", "DeformationQA"]
    testing = text[text.index("if(BUILD_TESTING)"):]
    for module in ("DeepRegistration", "DeformationQA"):
        assert re.search(rf"slicer_add_python_unittest\(SCRIPT \S*{module}\.py\)", testing), module
        source = (MODULE_DIR / f"{module}.py").read_text()
        assert f"class {module}Test(ScriptedLoadableModuleTest)" in source
        assert f"class {module}(ScriptedLoadableModule)" in source


def test_every_helper_and_resource_file_is_installed():
    text = _cmake(MODULE_DIR / "CMakeLists.txt")
    lib = set(re.findall(r"DeepRegistrationLib/\w+\.py", text))
    on_disk = {f"DeepRegistrationLib/{p.name}" for p in (MODULE_DIR / "DeepRegistrationLib").glob("*.py")}
    assert lib == on_disk, f"not installed: {sorted(on_disk - lib)}; listed but absent: {sorted(lib - on_disk)}"
    for resource in re.findall(r"^\s+((?:UI|Icons)/\S+)$", text, flags=re.M):
        assert (ROOT / "Resources" / resource).is_file(), resource
    assert {"UI/DeepRegistration.ui", "UI/DeformationQA.ui", "Icons/DeepRegistration.png",
            "Icons/DeformationQA.png"} <= set(re.findall(r"^\s+((?:UI|Icons)/\S+)$", text, flags=re.M))
    assert "GLOB_RECURSE _engine_scripts" in text  # the engine goes along, every file of it


@pytest.mark.parametrize("module", ["DeepRegistration", "DeformationQA"])
def test_module_metadata_is_registration(module):
    source = (MODULE_DIR / f"{module}.py").read_text()
    assert 'self.parent.categories = ["Registration"]' in source
    assert "self.parent.helpText" in source and "self.parent.acknowledgementText" in source


REPOSITORY = "DeepRegExtension/DeepRegExtension"


def test_license_is_the_apache_license_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_every_url_names_one_repository_and_files_that_exist():
    """The Extensions Index reads the homepage, icon and screenshots from the repository the
    ``.s4ext`` names: every URL must name that repository, and the raw file URLs existing files
    on its ``main`` branch (here: this checkout)."""
    sources = {name: (ROOT / name).read_text() for name in
               ("CMakeLists.txt", "DeepRegExtension.s4ext", "DeepRegExtension.json", "pyproject.toml")}
    urls = {(name, u) for name, text in sources.items() for u in re.findall(r"https://[^\s\"')]+", text)
            if "schema" not in u.lower()}
    assert len(urls) >= 10, urls
    for name, url in urls:
        assert f"github.com/{REPOSITORY}" in url or f"githubusercontent.com/{REPOSITORY}/" in url, (name, url)
        raw = re.match(rf"https://raw\.githubusercontent\.com/{REPOSITORY}/main/(.+)", url)
        if raw:
            assert (ROOT / raw.group(1)).is_file(), (name, url)


def test_the_weights_are_installed_once():
    text = _cmake(MODULE_DIR / "CMakeLists.txt")
    assert "deepreglib/models" not in text, "the weights must not be installed a second time"
    assert text.count("${_model_files}") == 1


def test_engine_finds_the_weights_in_the_slicer_install_layout(tmp_path):
    """Installed by Slicer: ``qt-scripted-modules/deepreglib`` beside
    ``qt-scripted-modules/Resources/Models``; the worker finds the weights there, and the module
    names the folder to its worker."""
    import shutil
    import subprocess
    import sys
    install = tmp_path / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    shutil.copytree(MODULE_DIR / "deepreglib", install / "deepreglib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (install / "Resources" / "Models").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "DEEPREG_MODELS"}
    env["PYTHONPATH"] = str(install)
    done = subprocess.run([sys.executable, "-c", "import deepreglib.io.models as m; print(m.__file__); print(m.models_dir())"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    module_file, found = done.stdout.strip().splitlines()
    assert module_file.startswith(str(install))
    assert Path(found) == install / "Resources" / "Models"
    sys.path.insert(0, str(MODULE_DIR))
    from DeepRegistrationLib.process import worker_environment
    env = worker_environment(str(install), str(install / "Resources" / "Models"))
    assert env["DEEPREG_MODELS"] == str(install / "Resources" / "Models")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(install)
