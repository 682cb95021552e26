"""benchmarks/evaluate.py --update: which datasets a rerun covers (no registration is run)."""
import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import evaluate  # noqa: E402


def _results(tmp_path):
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"format": 2, "quick": False, "refine_steps": 50, "machine": {"threads": 2},
                                "cases": {"a": {"dataset": "synthetic"}, "b": {"dataset": "brain_aseg"},
                                          "c": {"dataset": "oasis_pair"}},
                                "configs": {}, "results": []}))
    return path


def _args(path, **kw):
    return argparse.Namespace(update=str(path), methods=["preset-balanced"], datasets=None, quick=False,
                              refine=50, threads=1, **kw)


def test_update_reruns_the_named_datasets_only_or_all_of_the_file(tmp_path):
    path = _results(tmp_path)
    args = _args(path)
    evaluate._load_for_update(args, ["oasis_pair", "brain_aseg"])
    assert args.datasets == ["brain_aseg", "oasis_pair"] and args.threads == 2
    args = _args(path)
    evaluate._load_for_update(args, None)
    assert args.datasets == ["brain_aseg", "oasis_pair", "synthetic"]


def test_update_refuses_a_dataset_the_file_does_not_have(tmp_path):
    with pytest.raises(SystemExit, match="no ixi_muse cases"):
        evaluate._load_for_update(_args(_results(tmp_path)), ["ixi_muse"])
