"""The MUSE labels grouped into anatomical classes, and AMDF's label networks on the training
cache (issue 17)."""
import csv
import json

import numpy as np
import pytest
import torch

from deepreglib.core.errors import BadInputError
from deepreglib.train.label_groups import MUSE_CLASSES, MUSE_GROUPS, group_muse_labels, known_muse_indices


def test_every_muse_index_is_in_exactly_one_group_of_the_names_it_says():
    from conftest import SHARED_DATA
    indices = known_muse_indices()
    assert len(indices) == len(set(indices)) and MUSE_CLASSES == 17
    table = SHARED_DATA / "ixi_muse" / "labels.csv"
    if not table.is_file():
        pytest.skip(f"{table} is absent")
    names = {int(r["Index"]): r["Name"] for r in csv.DictReader(open(table))}
    assert set(names) <= set(indices)  # every named label has a class
    assert set(indices) - set(names) == {1, 46, 69}  # the three values the table does not name
    cls = {i: c for c, (_, members) in MUSE_GROUPS.items() for i in members}
    for i, name in names.items():
        if "Ventricle" in name and name.startswith(("Lateral", "InfLat")):
            assert cls[i] == 1, name
        if name.endswith("_WM_R") or name.endswith("_WM_L"):
            assert cls[i] in (8, 9), name  # cerebellar or cerebral white matter
        if "Occipital" in name and "WM" not in name:
            assert cls[i] == 13, name
        if "Temporal" in name and "WM" not in name:
            assert cls[i] == 12, name


def test_grouping_maps_the_values_and_refuses_a_map_that_is_not_muse():
    labels = torch.tensor([0, 51, 4, 1, 104, 207, 35]).view(1, 1, 7, 1, 1)
    grouped = group_muse_labels([labels, None])
    assert grouped[1] is None
    assert grouped[0].flatten().tolist() == [0, 1, 2, 16, 10, 12, 7]
    with pytest.raises(BadInputError, match=r"^b has labels \[2, 300\]"):
        group_muse_labels([labels, torch.tensor([0, 2, 300, 51]).view(1, 1, 4, 1, 1)], names=["a", "b"])


def test_label_sample_0_gives_the_label_maps_as_they_are():
    from deepreglib.train.loop import real_pair
    vols = [torch.rand(1, 1, 8, 8, 8) for _ in range(2)]
    labels = [torch.randint(0, 200, (1, 1, 8, 8, 8)) for _ in range(2)]
    batch = real_pair(vols, (8, 8, 8), np.random.default_rng(0), labels, 0)
    pair = {tuple(batch["fixed_labels"].flatten()[:20].tolist()), tuple(batch["moving_labels"].flatten()[:20].tolist())}
    assert pair == {tuple(l.flatten()[:20].tolist()) for l in labels}


def test_the_label_auto_encoder_trains_on_the_cache_s_grouped_labels(small_cache, tmp_path, capsys):
    """On the cache, amdf_ae learns the grouped MUSE classes of real scans (its card names them);
    drawing labels at random, or mixing in synthetic maps of other classes, is refused before
    anything is written."""
    from deepreglib.cli import main
    from deepreglib.methods.weights import load_model
    base = ["train", "amdf_ae", "--cache", str(small_cache), "--steps", "2", "--shape", "48", "64", "48",
            "--threads", "1"]
    for extra, message in ((["--real-fraction", "1"], "--label-sample 0"),
                           (["--label-sample", "0"], "--real-fraction 1")):
        assert main(base + ["--out", str(tmp_path / "refused")] + extra) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
    rc = main(base + ["--out", str(tmp_path / "run"), "--label-sample", "0", "--real-fraction", "1",
                      "--export", str(tmp_path / "ae")])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "loss.csv")))
    assert len(rows) == 2 and all(r["real"] == "1" and float(r["ce"]) > 0 for r in rows)
    model, card = load_model(tmp_path / "ae.pt")
    assert model.num_classes == MUSE_CLASSES
    assert card["label_classes"]["1"] == "lateral ventricles" and len(card["label_classes"]) == MUSE_CLASSES - 1


def _iterations(card):
    return int(json.loads(card.read_text()).get("iterations", 0))


def test_amdf_registration_trains_on_the_cache_with_its_label_terms_on_every_step(small_cache, tmp_path):
    """``amdf`` on the cache (after ``amdf_ae``): every pair is a labelled real pair, so the
    cross-entropy of the warped labels and the auto-encoder's anatomical term are in every step
    (AMDF's recipe trains on the labelled sets only; an unlabelled pair would drop both)."""
    from deepreglib.cli import main
    from deepreglib.methods.amdf.training import AMDF_RECIPE, LABELLED_SETS
    from deepreglib.io.models import models_dir
    from deepreglib.train.cache import DATASETS
    MODELS = models_dir()
    assert AMDF_RECIPE.cache_sets == LABELLED_SETS and all(DATASETS[s].labels for s in LABELLED_SETS)
    common = ["--cache", str(small_cache), "--shape", "48", "64", "48", "--threads", "1", "--label-sample", "0",
              "--real-fraction", "1"]
    assert main(["train", "amdf_ae", "--out", str(tmp_path / "ae_run"), "--steps", "1", *common,
                 "--export", str(tmp_path / "ae")]) == 0
    assert main(["train", "amdf", "--out", str(tmp_path / "run"), "--ae-model", str(tmp_path / "ae.pt"),
                 "--init-from", str(MODELS / "amdf.pt"), "--steps", str(_iterations(MODELS / "amdf.json") + 2),
                 *common]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "loss.csv")))
    assert len(rows) == 2 and all(r["real"] == "1" and float(r["ce"]) > 0 and float(r["ae"]) >= 0 for r in rows)
    assert main(["train", "amdf", "--out", str(tmp_path / "run"), "--ae-model", str(tmp_path / "ae.pt"),
                 "--steps", "1", *common, "--export", str(tmp_path / "amdf")]) == 0  # export only
    ae = json.loads((tmp_path / "ae.json").read_text())
    named = json.loads((tmp_path / "amdf.json").read_text())["anatomy_autoencoder"]
    assert named == {"file": "ae.pt", "sha256": ae["sha256"], "iterations": 1, "label_classes": MUSE_CLASSES - 1}
