"""deepreglib.io.protocol and the method registry are read by Slicer's own process: they must
import neither torch nor anything that does."""
import subprocess
import sys


def test_protocol_and_registry_import_without_torch():
    code = ("import sys, deepreglib.io.protocol as p, deepreglib.methods.registry as r; "
            "names = list(r.METHODS); inits = r.learned_initializers(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'voxelmorph' in names and 'dnet' in inits and p.EXIT_BAD_INPUT == 2")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_manifest_reader_refuses_what_is_not_a_manifest(tmp_path):
    import json
    import pytest
    from deepreglib.io.protocol import MANIFEST_FORMAT, read_manifest
    good = tmp_path / "manifest.json"
    good.write_text(json.dumps({"format": MANIFEST_FORMAT, "outputs": []}))
    assert read_manifest(good)["_folder"] == str(tmp_path)
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"format": "x/9", "outputs": []}))
    with pytest.raises(ValueError):
        read_manifest(bad)
