"""The ~145 MUSE labels of the training cache's ``ixi_muse`` scans grouped into 16 anatomical
classes, for training that needs the same classes in every scan (AMDF's label auto-encoder and
its cross-entropy term), where the Dice term of the registration networks draws labels at random
(:func:`~deepreglib.train.cache.sample_labels`).

The groups follow the MUSE names (``../shared/data/ixi_muse/labels.csv``), both hemispheres
together: the ventricles, six deep grey structures, the brain stem, the cerebellum, the cerebral
white matter and the cortex by lobe (frontal, parietal, temporal, occipital) with the limbic
cortex (cingulate, insula, medial temporal) apart, and the CSF outside the brain. Class 0 is the
background.

Three values of the label maps are not in ``labels.csv``; read off the train scans (IXI012):
1 (16,119 voxels at 2 mm, T1 75 where grey matter is 130) surrounds the cortex and borders the
background, the extra-cerebral CSF; 46 (197 voxels, T1 112) lies between the corpus callosum,
the thalami and the fornix, grouped with the third ventricle; 69 (11 voxels, bright) lies by the
ventral diencephala and the third ventricle, the optic chiasm's place, grouped with them."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch

from ..core.errors import BadInputError

#: class number -> (name, the MUSE indices in it)
MUSE_GROUPS: Dict[int, Tuple[str, Tuple[int, ...]]] = {
    1: ("lateral ventricles", (49, 50, 51, 52)),
    2: ("third and fourth ventricles", (4, 11, 46)),
    3: ("caudate and accumbens", (23, 30, 36, 37)),
    4: ("putamen and pallidum", (55, 56, 57, 58)),
    5: ("thalamus", (59, 60)),
    6: ("hippocampus and amygdala", (31, 32, 47, 48)),
    7: ("brain stem, ventral diencephalon and basal forebrain", (35, 61, 62, 69, 75, 76)),
    8: ("cerebellum", (38, 39, 40, 41, 71, 72, 73)),
    9: ("cerebral white matter", (81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95)),
    10: ("frontal cortex", (104, 105, 112, 113, 118, 119, 120, 121, 124, 125, 136, 137, 140, 141,
                            142, 143, 146, 147, 150, 151, 152, 153, 162, 163, 164, 165, 178, 179,
                            182, 183, 190, 191, 192, 193, 204, 205)),
    11: ("parietal cortex", (106, 107, 148, 149, 168, 169, 174, 175, 176, 177, 194, 195, 198, 199)),
    12: ("temporal cortex", (122, 123, 132, 133, 154, 155, 180, 181, 184, 185, 200, 201, 202, 203,
                             206, 207)),
    13: ("occipital cortex", (108, 109, 114, 115, 128, 129, 134, 135, 144, 145, 156, 157, 160, 161,
                              196, 197)),
    14: ("cingulate and insular cortex", (100, 101, 102, 103, 138, 139, 166, 167, 172, 173, 186, 187)),
    15: ("entorhinal and parahippocampal cortex", (116, 117, 170, 171)),
    16: ("extra-cerebral CSF", (1,)),
}
#: the number of classes, background included
MUSE_CLASSES = 1 + len(MUSE_GROUPS)


def muse_lookup() -> torch.Tensor:
    """``lut[muse_index]`` -> class (0 for the background and for indices no group holds)."""
    top = max(i for _, members in MUSE_GROUPS.values() for i in members)
    lut = torch.zeros(top + 1, dtype=torch.uint8)
    for cls, (_, members) in MUSE_GROUPS.items():
        lut[torch.tensor(members)] = cls
    return lut


def known_muse_indices() -> List[int]:
    return sorted(i for _, members in MUSE_GROUPS.values() for i in members)


def group_muse_labels(labels: Iterable, names: Iterable[str] = ()) -> List:
    """Each MUSE label map (``(1, 1, D, H, W)`` integers, or ``None`` for an unlabelled scan)
    as its 16 classes (uint8). A value that is neither 0 nor a MUSE index of a group is refused,
    naming the scan (``names``, parallel to ``labels``, when given): such a map is not MUSE's."""
    lut = muse_lookup()
    known = torch.zeros(len(lut), dtype=torch.bool)
    known[0] = True
    known[torch.tensor(known_muse_indices())] = True
    names = list(names)
    out = []
    for n, lab in enumerate(labels):
        if lab is None:
            out.append(None)
            continue
        values = torch.unique(lab)
        bad = [int(v) for v in values if not 0 <= int(v) < len(lut) or not bool(known[int(v)])]
        if bad:
            who = names[n] if n < len(names) else f"label map {n}"
            raise BadInputError(f"{who} has labels {bad[:8]}{' ...' if len(bad) > 8 else ''} that are not "
                                "MUSE indices of deepreglib.train.label_groups.MUSE_GROUPS: the grouped "
                                "classes need MUSE label maps (the cache's ixi_muse set)")
        out.append(lut[lab.long()])
    return out
