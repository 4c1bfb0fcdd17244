"""MR contrasts from tissue classes, and per-site scanner profiles.

Each voxel mixes tissue compartments (partial volume): white and grey matter, CSF, scalp fat,
bone, and the tumour compartments (enhancing tumour, necrosis, oedema, resection cavity,
treatment-related enhancement). Each compartment has relaxation times T1, T2 and a proton
density at 1.5 T and 3 T; the signal of a compartment follows the textbook equation of the
sequence (spin echo, inversion recovery spin echo for FLAIR with the inversion time that nulls
CSF, inversion-prepared 3D gradient echo for MPRAGE-like T1), and gadolinium shortens T1 as
1/T1 = 1/T1_0 + r1 [Gd].

Relaxation times: white/grey matter at 3 T from Stanisz et al. 2005 (MRM 54:507); at 1.5 T
white matter 780 ms and grey matter 1200 ms, within the published spread (WM ~600-900 ms), so that
spin-echo T1 images keep their familiar grey-white contrast;
CSF ~4.3 s / 2 s; subcutaneous fat T1/T2 from de Bazelaire et al. 2004 (Radiology 230:652), with
an effective proton density of 0.55 so that scalp fat is bright but not dazzling; tumour,
necrosis and oedema prolonged relative to white matter as reported for glioblastoma (values
rounded, phantom-grade). Gadolinium relaxivities from Rohrer et al. 2005 (Invest Radiol 40:715).

A site profile fixes the vendor, the field strength, the sequences (TR/TE/TI/flip), slice
thickness, signal-to-noise ratio, bias-field amplitude, the stored intensity range and the series
descriptions, so that sites differ as real hospitals do. Noise is Rician (magnitude of complex
Gaussian noise), the bias field a smooth random multiplicative field, the slice profile a
Gaussian of FWHM equal to the slice thickness.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_node.errors import InputError
from dicom_node.types import Volume

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
CONTRASTS = ("t1", "t1c", "t2", "flair")

# (T1 at 1.5 T ms, T1 at 3 T ms, T2 at 1.5 T ms, T2 at 3 T ms, proton density)
TISSUES: dict[str, tuple[float, float, float, float, float]] = {
    "wm": (780.0, 1084.0, 72.0, 69.0, 0.70),
    "gm": (1200.0, 1820.0, 95.0, 99.0, 0.80),
    "csf": (4200.0, 4300.0, 2000.0, 2000.0, 1.00),
    "fat": (343.0, 382.0, 58.0, 68.0, 0.55),
    "bone": (500.0, 550.0, 1.0, 1.0, 0.05),
    "enhancing": (1250.0, 1650.0, 110.0, 100.0, 0.85),
    "necrotic": (2000.0, 2500.0, 250.0, 220.0, 0.95),
    "oedema": (1300.0, 1600.0, 140.0, 130.0, 0.88),
    "cavity": (3500.0, 3800.0, 900.0, 850.0, 0.98),
    "psp": (1150.0, 1500.0, 120.0, 110.0, 0.87),
}
# Gadolinium concentration (mM) reached in each compartment after a 0.1 mmol/kg injection.
GD_MM = {"enhancing": 0.18, "psp": 0.12}

# r1 (1/(mM s)) at (1.5 T, 3 T), Rohrer et al. 2005, in plasma at 37 C
AGENTS: dict[str, tuple[float, float]] = {
    "Gadobutrol": (5.2, 5.0),
    "Gadoterate meglumine": (3.6, 3.5),
    "Gadobenate dimeglumine": (6.3, 5.5),
}


@dataclass(frozen=True)
class Sequence:
    """Acquisition parameters of one series (DICOM MR Image module vocabulary)."""

    kind: str  # "SE", "IR" (FLAIR) or "MPRAGE"
    tr: float
    te: float
    ti: float = 0.0
    flip: float = 90.0
    acquisition: str = "2D"
    echo_train: int = 1
    scanning_sequence: str = "SE"
    sequence_variant: str = "SK\\SP"
    scan_options: str = ""
    sequence_name: str = ""


@dataclass(frozen=True)
class SiteProfile:
    site: str
    institution: str
    manufacturer: str
    model: str
    software: str
    field_t: float
    slice_mm: float
    inplane_mm: float
    snr: float  # mean white-matter signal / noise sigma
    bias: float  # std of the log bias field
    max_value: int  # stored intensity of bright tissue
    agent: str
    study_description: str
    descriptions: dict[str, str]
    sequences: dict[str, Sequence] = field(default_factory=dict)

    def with_noise(self, snr: float, bias: float) -> SiteProfile:
        return replace(self, snr=snr, bias=bias)


def _mprage(tr: float, te: float, ti: float, flip: float, name: str) -> Sequence:
    return Sequence("MPRAGE", tr, te, ti, flip, "3D", 1, "GR\\IR", "SP\\MP", "", name)


def _se(tr: float, te: float, name: str, echo_train: int = 1) -> Sequence:
    variant = "SK\\SP\\OSP" if echo_train > 1 else "SK\\SP"
    return Sequence("SE", tr, te, 0.0, 90.0, "2D", echo_train, "SE", variant, "", name)


def _flair(tr: float, te: float, name: str, echo_train: int) -> Sequence:
    return Sequence("IR", tr, te, 0.0, 90.0, "2D", echo_train, "SE\\IR", "SK\\SP\\MP", "", name)


BASE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        site="",
        institution="Klinikum Nordstadt Universitätsmedizin",
        manufacturer="SIEMENS",
        model="Skyra",
        software="syngo MR E11",
        field_t=3.0,
        slice_mm=1.0,
        inplane_mm=1.0,
        snr=32.0,
        bias=0.10,
        max_value=1200,
        agent="Gadobutrol",
        study_description="Kopf^Tumor Verlauf",
        descriptions={
            "t1": "t1_mprage_tra_p2_iso",
            "t1c": "t1_mprage_tra_p2_iso_post_Gd",
            "t2": "t2_tse_tra_p2",
            "flair": "t2_tirm_tra_dark-fluid",
        },
        sequences={
            "t1": _mprage(2300, 2.3, 1100, 8, "*tfl3d1_16ns"),
            "t2": _se(6000, 95, "*tse2d1_16", 16),
            "flair": _flair(9000, 81, "*tir2d1_16", 16),
        },
    ),
    SiteProfile(
        site="",
        institution="Hôpital Saint-Éloi",
        manufacturer="GE MEDICAL SYSTEMS",
        model="Signa HDxt",
        software="15\\LX\\MR Software release:15.0_M4A_0947.a",
        field_t=1.5,
        slice_mm=5.0,
        inplane_mm=0.9,
        snr=22.0,
        bias=0.06,
        max_value=2600,
        agent="Gadoterate meglumine",
        study_description="IRM CEREBRALE SANS ET AVEC INJECTION",
        descriptions={
            "t1": "AX T1 PRE",
            "t1c": "AX T1 POST GD",
            "t2": "AX T2 FSE",
            "flair": "AX T2 FLAIR",
        },
        sequences={
            "t1": _se(500, 10, "memp"),
            "t2": _se(4500, 102, "fse-xl", 16),
            "flair": _flair(9000, 120, "fse-xl", 24),
        },
    ),
    SiteProfile(
        site="",
        institution="Ziekenhuis Oosterhaven",
        manufacturer="Philips Medical Systems",
        model="Ingenia",
        software="5.4.1\\5.4.1.0",
        field_t=3.0,
        slice_mm=3.0,
        inplane_mm=0.8,
        snr=28.0,
        bias=0.14,
        max_value=900,
        agent="Gadobutrol",
        study_description="MRI Hersenen met contrast",
        descriptions={
            "t1": "T1W_3D_TFE",
            "t1c": "T1W_3D_TFE_Gd",
            "t2": "T2W_TSE",
            "flair": "T2W_FLAIR",
        },
        sequences={
            "t1": _mprage(2000, 3.7, 1100, 8, "T1TFE"),
            "t2": _se(3000, 80, "TSE", 15),
            "flair": _flair(11000, 125, "IRTSE", 35),
        },
    ),
    SiteProfile(
        site="",
        institution="Hospital Clínico San Tadeo",
        manufacturer="SIEMENS",
        model="Aera",
        software="syngo MR E11",
        field_t=1.5,
        slice_mm=4.0,
        inplane_mm=0.7,
        snr=18.0,
        bias=0.05,
        max_value=1800,
        agent="Gadobenate dimeglumine",
        study_description="RM CRANEO SIN Y CON CONTRASTE",
        descriptions={
            "t1": "t1_se_tra",
            "t1c": "t1_se_tra_post_Gd",
            "t2": "t2_tse_tra",
            "flair": "t2_tirm_tra_FLAIR",
        },
        sequences={
            "t1": _se(550, 12, "*se2d1"),
            "t2": _se(5000, 98, "*tse2d1_13", 13),
            "flair": _flair(8500, 90, "*tir2d1_16", 16),
        },
    ),
    SiteProfile(
        site="",
        institution="Szpital Wojewódzki w Łąkowie",
        manufacturer="GE MEDICAL SYSTEMS",
        model="DISCOVERY MR750",
        software="DV26.0_R03_1831.b",
        field_t=3.0,
        slice_mm=2.0,
        inplane_mm=1.0,
        snr=35.0,
        bias=0.12,
        max_value=3000,
        agent="Gadobutrol",
        study_description="MR GLOWY BEZ I Z KONTRASTEM",
        descriptions={
            "t1": "Ax 3D BRAVO",
            "t1c": "Ax 3D BRAVO +C",
            "t2": "Ax T2 PROPELLER",
            "flair": "Ax T2 FLAIR",
        },
        sequences={
            "t1": _mprage(2100, 3.2, 1100, 12, "efgre3d"),
            "t2": _se(5500, 110, "propeller", 32),
            "flair": _flair(10000, 140, "fse-ir", 24),
        },
    ),
)

SITE_CODES = ("NOR", "ELO", "OST", "TAD", "LAK")


def site_profiles(n_sites: int, rng: np.random.Generator) -> list[SiteProfile]:
    """``n_sites`` profiles: the base profiles in turn, each with its own SNR and bias field."""
    if n_sites < 1:
        raise InputError(f"the number of sites must be >= 1, found {n_sites}")
    out = []
    for s in range(n_sites):
        base = BASE_PROFILES[s % len(BASE_PROFILES)]
        code = SITE_CODES[s % len(SITE_CODES)] + (str(s // len(SITE_CODES) + 1) if s >= 5 else "")
        snr = base.snr * float(rng.uniform(0.85, 1.15))
        bias = base.bias * float(rng.uniform(0.8, 1.25))
        out.append(replace(base.with_noise(snr, bias), site=f"SITE-{code}"))
    return out


def _post_sequence(profile: SiteProfile) -> Sequence:
    return profile.sequences["t1"]


def sequence_for(profile: SiteProfile, contrast: str) -> Sequence:
    if contrast == "t1c":
        return _post_sequence(profile)
    return profile.sequences[contrast]


def flair_null_ti(t1_csf: float, tr: float) -> float:
    """Inversion time that nulls a tissue of relaxation time ``t1_csf`` for repetition ``tr``."""
    return t1_csf * math.log(2.0 / (1.0 + math.exp(-tr / t1_csf)))


def compartment_signal(profile: SiteProfile, contrast: str, tissue: str) -> float:
    """Signal of a pure compartment for this site's sequence (arbitrary units)."""
    t1_15, t1_3, t2_15, t2_3, pd = TISSUES[tissue]
    hi = profile.field_t >= 2.0
    t1, t2 = (t1_3, t2_3) if hi else (t1_15, t2_15)
    if contrast == "t1c" and tissue in GD_MM:
        r1 = AGENTS[profile.agent][1 if hi else 0]
        t1 = 1000.0 / (1000.0 / t1 + r1 * GD_MM[tissue])
    seq = sequence_for(profile, contrast)
    e2 = math.exp(-seq.te / t2)
    if seq.kind == "SE":
        return pd * (1.0 - math.exp(-seq.tr / t1)) * e2
    if seq.kind == "IR":
        ti = seq.ti or flair_null_ti(TISSUES["csf"][1 if hi else 0], seq.tr)
        return pd * abs(1.0 - 2.0 * math.exp(-ti / t1) + math.exp(-seq.tr / t1)) * e2
    if seq.kind == "MPRAGE":
        # inversion-prepared gradient echo, signal of the centre of k-space (sin(flip) scaling)
        mz = 1.0 - 2.0 * math.exp(-seq.ti / t1) + math.exp(-seq.tr / t1)
        return pd * abs(mz) * math.sin(math.radians(seq.flip)) * e2
    raise InputError(f"sequence kind must be SE, IR or MPRAGE, found {seq.kind!r}")


def effective_ti(profile: SiteProfile, contrast: str) -> float:
    seq = sequence_for(profile, contrast)
    if seq.kind == "IR" and not seq.ti:
        return flair_null_ti(TISSUES["csf"][1 if profile.field_t >= 2.0 else 0], seq.tr)
    return seq.ti


def synthesise(profile: SiteProfile, contrast: str, fractions: dict[str, FloatArray]) -> FloatArray:
    """Noise-free image: fraction-weighted sum of the compartments' signals."""
    out = np.zeros(next(iter(fractions.values())).shape, dtype=np.float32)
    for tissue, frac in fractions.items():
        out += np.float32(compartment_signal(profile, contrast, tissue)) * frac
    return out


def inplane_resolution(image: FloatArray, spacing: float, profile: SiteProfile) -> FloatArray:
    """Blur in-plane to the site's native resolution when the grid is finer than it.

    The point-spread function is a Gaussian whose FWHM is the native pixel size; only the part
    that the grid does not already impose (quadrature difference) is applied.
    """
    extra = profile.inplane_mm**2 - spacing**2
    if extra <= 1e-6:
        return image
    sigma = math.sqrt(extra) / 2.3548 / spacing
    return ndimage.gaussian_filter(image, (0.0, sigma, sigma)).astype(np.float32)


def acquisition_grid(sim: Volume, profile: SiteProfile) -> Volume:
    """The site's grid: the simulation grid in-plane, slices at max(spacing, slice thickness)."""
    s = sim.spacing[0]
    dz = max(s, profile.slice_mm)
    if math.isclose(dz, s):
        return sim
    extent = (sim.shape[0] - 1) * s
    nz = math.floor(extent / dz) + 1
    z0 = sim.origin[2] + (extent - (nz - 1) * dz) / 2.0
    return Volume(
        array=np.zeros((nz, sim.shape[1], sim.shape[2]), dtype=bool),
        spacing=(s, s, dz),
        origin=(sim.origin[0], sim.origin[1], z0),
        direction=sim.direction,
    )


def to_acquisition(
    image: FloatArray, sim: Volume, acq: Volume, blur: bool = True, order: int = 1
) -> FloatArray:
    """Resample along the slice axis with a Gaussian slice profile (FWHM = thickness)."""
    if acq.shape == sim.shape:
        return image.astype(np.float32)
    s, dz = sim.spacing[2], acq.spacing[2]
    if blur:
        sigma = (dz / s) / 2.3548
        image = ndimage.gaussian_filter1d(image.astype(np.float32), sigma, axis=0)
    kz = (acq.origin[2] + np.arange(acq.shape[0]) * dz - sim.origin[2]) / s
    coords_k = np.broadcast_to(kz[:, None, None], acq.shape)
    jj, ii = np.meshgrid(np.arange(acq.shape[1]), np.arange(acq.shape[2]), indexing="ij")
    coords = np.stack(
        [coords_k, np.broadcast_to(jj, acq.shape), np.broadcast_to(ii, acq.shape)]
    ).astype(np.float32)
    return ndimage.map_coordinates(image, coords, order=order, mode="nearest").astype(np.float32)


def bias_field(
    shape: tuple[int, int, int], sigma_log: float, rng: np.random.Generator
) -> FloatArray:
    """Smooth multiplicative field exp(g), g a random cubic polynomial in (z, y, x) of sd sigma_log.

    Receive-coil sensitivity varies slowly over the head; a low-order polynomial is the usual
    model (as in N4 / the BrainWeb simulator's RF inhomogeneity fields).
    """
    z, y, x = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
    degree = 3
    g = np.zeros(shape, dtype=np.float32)
    for p in range(degree + 1):
        plane = np.zeros(shape[1:], dtype=np.float32)
        for q in range(degree + 1 - p):
            line = np.zeros(shape[2], dtype=np.float32)
            for r in range(degree + 1 - p - q):
                if p + q + r:
                    line += np.float32(rng.normal(0.0, 1.0) / (p + q + r)) * x**r
            plane += (y**q)[:, None] * line[None, :]
        g += (z**p)[:, None, None] * plane[None]
    g = (g - g.mean()) / max(float(g.std()), 1e-6) * sigma_log
    return np.exp(g).astype(np.float32)


def acquire(
    clean: FloatArray,
    profile: SiteProfile,
    wm_signal: float,
    brain_mask: npt.NDArray[np.bool_],
    rng: np.random.Generator,
) -> npt.NDArray[np.uint16]:
    """Bias field, Rician noise and scaling to the site's stored integer range."""
    img = clean * bias_field(clean.shape, profile.bias, rng)
    sigma = abs(wm_signal) / profile.snr if wm_signal else 1e-3
    real = img + np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    mag = np.sqrt(real * real + imag * imag)
    ref = float(np.percentile(mag[brain_mask], 99.5)) if brain_mask.any() else float(mag.max())
    scale = profile.max_value / max(ref, 1e-6)
    return np.clip(np.rint(mag * scale), 0, 4095).astype(np.uint16)
