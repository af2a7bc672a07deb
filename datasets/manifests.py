"""What a complete copy of each standard dataset holds: the expected numbers of tampered and authentic images, the
file list MPC names for it, and where the numbers come from. `check_manifest` compares an adapter's listing with it,
so that an incomplete download is reported ("found 870 of the 920 tampered images of CASIA v1.0") instead of
silently giving a smaller test set; where the dataset's names follow a rule, the first missing files are named.

`tampered` counts the tampered images that have a mask, i.e. the pairs the adapter in `datasets.adapters` lists for a
complete copy; where the release holds more tampered images than that, `release_tampered` says how many.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

# stems found → the stems that a complete copy has and these lack (lower case, in the dataset's order); the naming
# rule may predict only some of them (Columbia: only for the camera pairs present).
MissingNames = Callable[[Sequence[str]], list]


def _numbered(pattern: str, template: str, numbers: range) -> MissingNames:
    """Names `template.format(n)` for n in `numbers`; a found stem counts by its number (so 7t and 07t are one)."""
    compiled = re.compile(pattern, re.IGNORECASE)

    def missing(stems: Sequence[str]) -> list:
        found = {int(match.group(1)) for stem in stems if (match := compiled.fullmatch(stem))}
        return [template.format(n) for n in numbers if n not in found]

    return missing


def _fixed(names: Sequence[str]) -> MissingNames:
    def missing(stems: Sequence[str]) -> list:
        found = {stem.lower() for stem in stems}
        return [name for name in names if name.lower() not in found]

    return missing


COLUMBIA_PER_PAIR = 30  # sub_01 … sub_30 for each of the six camera pairs (6 × 30 = 180)


def _columbia_missing(stems: Sequence[str]) -> list:
    """Columbia's spliced images are `{camera}_{camera}_sub_{NN}`; for each camera pair present, the numbers
    01…30 that are absent. A camera pair with no image at all cannot be named (its camera order is not fixed)."""
    by_pair: dict[str, set[int]] = {}
    for stem in stems:
        match = re.fullmatch(r"(.+)_sub_(\d+)", stem, re.IGNORECASE)
        if match:
            by_pair.setdefault(match.group(1).lower(), set()).add(int(match.group(2)))
    return [f"{pair}_sub_{n:02d}" for pair, numbers in sorted(by_pair.items())
            for n in range(1, COLUMBIA_PER_PAIR + 1) if n not in numbers]


NOSO_FORGERIES = ("01_mod", "02_mod", "03_mod", "04_mod", "05_mod", "06_mod", "07_mod_01", "07_mod_02", "08_mod_01",
                  "08_mod_02", "08_mod_03", "09_mod_01", "09_mod_02", "10_mod_01", "10_mod_02", "11_mod", "12_mod",
                  "13_mod")


@dataclass(frozen=True)
class Manifest:
    """One standard dataset: what a complete copy holds, MPC's list for it, and the sources of the numbers."""

    dataset: str                      # the adapter's name (datasets.adapters.ADAPTERS)
    title: str
    tampered: int                     # tampered images with a mask in a complete copy (the adapter's pairs)
    authentic: Optional[int]          # authentic images in a complete copy; None: not documented, not checked
    mpc_list: Optional[str]           # the list MPC / FOCAL name for this set (`<name>_<N>`), if any
    source: str
    note: str = ""
    release_tampered: Optional[int] = None  # tampered images in the release when some have no mask
    missing_tampered: Optional[MissingNames] = None
    missing_authentic: Optional[MissingNames] = None

    @property
    def mpc_count(self) -> Optional[int]:
        return int(self.mpc_list.rsplit("_", 1)[1]) if self.mpc_list else None


MANIFESTS: dict[str, Manifest] = {m.dataset: m for m in (
    Manifest(
        "casia1", "CASIA v1.0", tampered=920, release_tampered=921, authentic=800, mpc_list="CASIAv1_920",
        source="CASIA TIDE v1.0 (Dong et al., ChinaSIP 2013): 921 tampered (spliced and copy-move, JPEG) and 800 "
               "authentic images, 8 categories × 100 (namtpham/casia1groundtruth README); masks from the public "
               "ground truth (namtpham/casia1groundtruth)",
        note="one tampered image has no mask (Sp_D_NRN_A_cha0011_sec0011_0542, SunnyHaze/IML-ViT issue #10): "
             "921 images, 920 pairs = MPC's CASIAv1_920"),
    Manifest(
        "casia2", "CASIA v2.0", tampered=5123, authentic=7491, mpc_list="CASIA2_5123",
        source="CASIA v2.0 page (forensics.idealtest.org/casiav2): 7491 authentic and 5123 tampered colour images; "
               "masks from namtpham/casia2groundtruth",
        note="copies downloaded before 2021-04-20 need the renaming in namtpham/casia2groundtruth's spreadsheet; "
             "unrenamed images show up as 'image without mask'"),
    Manifest(
        "columbia", "Columbia uncompressed", tampered=180, authentic=183, mpc_list="Columbia_160",
        source="Columbia Uncompressed Image Splicing page (ee.columbia.edu/ln/dvmm/downloads/authsplcuncmp): "
               "4cam_splc holds 180 images, 4cam_auth 183",
        note="MPC's (and FOCAL's) list Columbia_160 has 20 fewer; neither repository says which 20 or why, so a "
             "complete download lists 180 and the 160 cannot be rebuilt from the release alone. Names: six camera "
             "pairs × {pair}_sub_01…30",
        missing_tampered=_columbia_missing),
    Manifest(
        "coverage", "COVERAGE", tampered=100, authentic=100, mpc_list="Coverage_100",
        source="COVERAGE (Wen et al., ICIP 2016; github.com/wenbihan/coverage): 100 forged images {N}t.tif with "
               "masks {N}forged.tif and their 100 originals {N}.tif, N = 1…100",
        note="nine masks (N = 41, 48, 55–59, 61, 95) have another size than their image; the row check reports them",
        missing_tampered=_numbered(r"(\d+)t", "{}t", range(1, 101)),
        missing_authentic=_numbered(r"(\d+)", "{}", range(1, 101))),
    Manifest(
        "nist16", "NIST Nimble 2016", tampered=564, authentic=None, mpc_list="NIST_564",
        source="NC2016_Test0613: the IsTarget=Y rows of reference/manipulation/NC2016-manipulation-ref.csv, 564 "
               "manipulated probes with masks (SunnyHaze/IML-Dataset-Corrections issue #1)",
        note="authentic (IsTarget=N) probes are not counted here: no documented number was found. Names (NC2016_####) "
             "cannot be predicted: count only"),
    Manifest(
        "imd2020", "IMD2020 real-life", tampered=2010, authentic=None, mpc_list="IMD_2010",
        source="IMD2020 real-life manipulated images (Novozamsky et al., WACV Workshops 2020): 2010 manipulated "
               "images with hand-made masks; MPC trains on IMD_2010",
        note="the release's originals ({id}_orig.*) are not counted: no documented number was found. Names per "
             "source folder cannot be predicted: count only"),
    Manifest(
        "korus", "Korus realistic tampering", tampered=220, authentic=220, mpc_list="Korus_220",
        source="Realistic Tampering Dataset (Korus & Huang, TIFS 2017, 'Multi-scale analysis strategies in PRNU-based "
               "tampering localization'): 220 tampered 1920×1080 TIFF images and their 220 pristine originals",
        note="names are camera file names (DSC…, DPP…, r…): count only"),
    Manifest(
        "noso", "NoSo copy-move", tampered=18, authentic=13, mpc_list=None,
        source="the release's readme.txt: 13 originals {NN}.png, 18 forgeries {NN}_mod[_{k}].png with masks "
               "{NN}_mod[_{k}]_gt.png",
        missing_tampered=_fixed(NOSO_FORGERIES),
        missing_authentic=_numbered(r"(\d+)", "{:02d}", range(1, 14))),
    Manifest(
        "dso1", "DSO-1", tampered=100, authentic=100, mpc_list="DSO_100",
        source="DSO-1 (de Carvalho et al., TIFS 2013): 200 images, 100 spliced splicing-NN.png and 100 normal "
               "normal-NN.png",
        missing_tampered=_numbered(r"splicing-(\d+)", "splicing-{:02d}", range(1, 101)),
        missing_authentic=_numbered(r"normal-(\d+)", "normal-{:02d}", range(1, 101))),
)}


@dataclass(frozen=True)
class ManifestCheck:
    """One comparison: the tampered (or authentic) images found against what a complete copy holds."""

    manifest: Manifest
    kind: str          # "tampered" or "authentic"
    expected: int
    found: int
    missing: tuple     # the missing names the naming rule predicts (maybe fewer than expected - found)

    @property
    def ok(self) -> bool:
        return self.found == self.expected

    def message(self, first: int = 5) -> str:
        what = f"{self.kind} images of {self.manifest.title}"
        if self.kind == "tampered" and self.manifest.release_tampered is not None:
            what = f"{self.kind} images with a mask of {self.manifest.title}"
        text = f"found {self.found} of the {self.expected} {what}"
        if self.ok:
            return text + ": complete"
        if self.found > self.expected:
            return text + ": more than a complete copy holds (other files in the folder, or another version?)"
        text += ": incomplete download?"
        if self.missing:
            shown = ", ".join(self.missing[:first])
            more = len(self.missing) - first
            text += f" missing: {shown}" + (f" and {more} more named by the naming rule" if more > 0 else "")
            unnamed = self.expected - self.found - len(self.missing)
            if unnamed > 0:
                text += f" ({unnamed} more that the naming rule cannot name)"
        return text


def _stems(paths: Sequence[str]) -> list:
    return [Path(path).stem for path in paths]


def check_manifest(dataset: str, listing, with_authentic: bool = True) -> list:
    """Compare an adapter's listing (`datasets.adapters.Listing`) of `dataset` with its manifest: the tampered
    pairs always, the authentic images when `with_authentic` and the number is known. [] for a set without one."""
    manifest = MANIFESTS.get(dataset)
    if manifest is None:
        return []
    stems = _stems([pair.image for pair in listing.pairs])
    missing = manifest.missing_tampered(stems) if manifest.missing_tampered else []
    checks = [ManifestCheck(manifest, "tampered", manifest.tampered, len(listing.pairs), tuple(missing))]
    if with_authentic and manifest.authentic is not None:
        stems = _stems(listing.authentic)
        missing = manifest.missing_authentic(stems) if manifest.missing_authentic else []
        checks.append(ManifestCheck(manifest, "authentic", manifest.authentic, len(listing.authentic),
                                    tuple(missing)))
    return checks


def manifest_table() -> str:
    """The manifests as a Markdown table (for `generate_flist.py --manifests` and the README)."""
    lines = ["| dataset | tampered (with mask) | authentic | MPC list | source | note |",
             "|---|---:|---:|---|---|---|"]
    for m in MANIFESTS.values():
        tampered = f"{m.tampered}" + (f" (release: {m.release_tampered})" if m.release_tampered else "")
        authentic = "not checked" if m.authentic is None else str(m.authentic)
        lines.append(f"| `{m.dataset}` {m.title} | {tampered} | {authentic} | {m.mpc_list or '—'} | {m.source} | "
                     f"{m.note or '—'} |")
    return "\n".join(lines)
