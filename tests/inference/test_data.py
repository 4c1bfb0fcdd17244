"""The cohort dataset: table, site split, model-space preparation, NIfTI reading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dicom_node.convert.preprocess import foreground_mask_array
from dicom_node.errors import InputError
from dicom_node.types import Volume
from inference.data import (
    CohortDataset,
    class_index,
    prepare_study,
    read_cohort,
    read_volume,
    split_cohort,
    study_inputs_from_nifti,
    write_volume,
)
from inference.model_config import PreprocessingConfig, tiny_config
from inference.synthetic.cohort import PatientRecord

Cohort = tuple[Path, list[PatientRecord]]


def test_read_cohort_matches_the_table(tiny_cohort: Cohort) -> None:
    folder, records = tiny_cohort
    patients = read_cohort(folder)
    assert [p.patient_id for p in patients] == [r.patient_id for r in records]
    for p, r in zip(patients, records, strict=True):
        assert p.site == r.values["site"]
        assert p.survival_class == r.values["survival_class"]
        assert p.response_category == r.values["response_category"]
        assert (p.folder / "pre_t1c.nii.gz").is_file()
        assert p.cohort_seed == 4242


def test_read_cohort_errors_name_what_is_missing(tmp_path: Path, tiny_cohort: Cohort) -> None:
    with pytest.raises(InputError, match=r"cohort\.csv"):
        read_cohort(tmp_path)
    with pytest.raises(InputError, match="twice"):
        read_cohort([tiny_cohort[0], tiny_cohort[0]])
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (tiny_cohort[0] / "cohort.csv").read_text(encoding="utf-8")
    (broken / "cohort.csv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match="expected NIfTI files"):
        read_cohort(broken)


def test_split_holds_out_whole_sites_deterministically(tiny_cohort: Cohort) -> None:
    patients = read_cohort(tiny_cohort[0])
    split = split_cohort(patients, n_held_out_sites=1, seed=3)
    assert len(split.held_out_sites) == 1
    assert {p.site for p in split.held_out} == set(split.held_out_sites)
    assert not {p.site for p in split.train} & set(split.held_out_sites)
    assert len(split.train) + len(split.held_out) == len(patients)
    again = split_cohort(list(reversed(patients)), n_held_out_sites=1, seed=3)
    assert again == split
    sites = sorted({p.site for p in patients})
    named = split_cohort(patients, held_out_sites=[sites[0]])
    assert named.held_out_sites == (sites[0],)
    # the seed picks the site: over a few seeds both sites get held out
    picked = {split_cohort(patients, seed=s).held_out_sites for s in range(8)}
    assert picked == {(sites[0],), (sites[1],)}
    none = split_cohort(patients, n_held_out_sites=0)
    assert none.held_out == () and len(none.train) == len(patients)


def test_split_errors(tiny_cohort: Cohort) -> None:
    patients = read_cohort(tiny_cohort[0])
    with pytest.raises(InputError, match="unknown"):
        split_cohort(patients, held_out_sites=["SITE-NOWHERE"])
    with pytest.raises(InputError, match="fewer than"):
        split_cohort(patients, n_held_out_sites=2)
    with pytest.raises(InputError, match="every patient is held out"):
        split_cohort(patients, held_out_seeds=[4242])


def test_dataset_items_on_the_model_grid(tiny_cohort: Cohort) -> None:
    cfg = tiny_config()
    patients = read_cohort(tiny_cohort[0])
    ds = CohortDataset(patients, cfg.preprocessing, cfg.contrasts, True, cfg.survival_classes)
    assert len(ds) == len(patients)
    s = ds[0]
    shape = cfg.preprocessing.crop_shape
    for arr in (s.study.t1c, s.post_t1c, s.study.mask, s.post_mask, s.pre_mask):
        assert arr.shape == shape
    assert s.study.flair is not None and s.study.dose is not None
    assert s.study.t1c.dtype == np.float32 and s.post_t1c.dtype == np.float32
    assert s.study.grid.spacing == cfg.preprocessing.spacing_mm
    head = foreground_mask_array(s.study.t1c)
    assert abs(float(s.study.t1c[head].mean())) < 1e-3
    assert float(s.study.t1c[head].std()) == pytest.approx(1.0, abs=1e-3)
    assert s.study.mask.any() and s.study.mask.dtype == bool
    assert s.pre_mask.any()
    assert 50.0 < float(s.study.dose.max()) < 70.0  # Gy
    assert s.class_index == cfg.survival_classes.index(patients[0].survival_class)
    assert ds[0] is s  # cached
    other = CohortDataset(patients, cfg.preprocessing, cfg.contrasts, True, cfg.survival_classes)
    np.testing.assert_array_equal(other[0].study.t1c, s.study.t1c)
    np.testing.assert_array_equal(other[0].post_t1c, s.post_t1c)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_preparation_in_processes_gives_the_same_samples_in_order(tiny_cohort: Cohort) -> None:
    cfg = tiny_config()
    patients = read_cohort(tiny_cohort[0])
    serial = CohortDataset(patients, cfg.preprocessing, cfg.contrasts, True, cfg.survival_classes)
    parallel = CohortDataset(patients, cfg.preprocessing, cfg.contrasts, True, cfg.survival_classes)
    first = parallel[1]  # already prepared: taken from the cache, not prepared again
    samples = list(parallel.prepared(jobs=2))
    assert samples[1] is first and len(samples) == len(patients)
    for i, s in enumerate(samples):
        assert s.patient_id == patients[i].patient_id
        np.testing.assert_array_equal(s.study.t1c, serial[i].study.t1c)
        np.testing.assert_array_equal(s.post_mask, serial[i].post_mask)
        assert parallel[i] is s  # kept


def test_dataset_leaves_out_inputs_the_model_does_not_read(tiny_cohort: Cohort) -> None:
    cfg = tiny_config(contrasts=("t1c",), use_dose=False)
    ds = CohortDataset(read_cohort(tiny_cohort[0])[:1], cfg.preprocessing, cfg.contrasts, False)
    assert ds[0].study.flair is None and ds[0].study.dose is None
    assert class_index("unknown", ("short", "long")) == 2


def test_preparation_keeps_the_tumour_volume_at_source_resolution(tiny_cohort: Cohort) -> None:
    """On a model grid at the source spacing, large enough for the head, the GTV is carried over
    with its volume (the preprocessing converters, not a copy of them)."""
    patients = read_cohort(tiny_cohort[0])
    inputs = study_inputs_from_nifti(patients[0].folder)
    pre = PreprocessingConfig(spacing_mm=(4.0, 4.0, 4.0), crop_shape=(64, 64, 64))
    prepared = prepare_study(inputs, pre)
    source_ml = inputs.tumour_mask.array.sum() * np.prod(inputs.t1c.spacing) / 1000
    model_ml = prepared.mask.sum() * 64 / 1000
    assert model_ml == pytest.approx(source_ml, rel=0.15)
    assert prepared.prediction_inputs().shape == (64, 64, 64)


def test_nifti_inputs_and_errors(tiny_cohort: Cohort, tmp_path: Path) -> None:
    patient = read_cohort(tiny_cohort[0])[0]
    inputs = study_inputs_from_nifti(patient.folder.parent, "short")  # the patient folder works
    assert inputs.survival_class == "short"
    assert inputs.tumour_mask.array.dtype == bool
    assert inputs.flair is not None and inputs.dose is not None
    with pytest.raises(InputError, match=r"pre_t1c\.nii\.gz"):
        study_inputs_from_nifti(tmp_path)


def test_a_gtv_that_is_not_a_binary_mask_is_refused(tiny_cohort: Cohort, tmp_path: Path) -> None:
    """A probability map was read as a mask at > 0 (a 41 ml tumour became 1127 ml), an empty
    mask as no tumour (a "complete response" of nothing): both are refused, a 0/255 mask is
    taken."""
    patient = read_cohort(tiny_cohort[0])[0]
    for name in ("pre_t1c.nii.gz", "gtv.nii.gz"):
        (tmp_path / name).write_bytes((patient.folder / name).read_bytes())
    gtv = read_volume(tmp_path / "gtv.nii.gz")
    inside = np.asarray(gtv.array) > 0
    write_volume(gtv.with_array(inside.astype(np.float32) * 0.7 + 0.1), tmp_path / "gtv.nii.gz")
    with pytest.raises(InputError, match=r"expected a binary mask .* found 2 values \(0.1, 0.8\)"):
        study_inputs_from_nifti(tmp_path)
    write_volume(gtv.with_array(np.zeros_like(inside, np.uint8)), tmp_path / "gtv.nii.gz")
    with pytest.raises(InputError, match="found an empty mask"):
        study_inputs_from_nifti(tmp_path)
    write_volume(gtv.with_array(inside.astype(np.uint8) * 255), tmp_path / "gtv.nii.gz")
    assert study_inputs_from_nifti(tmp_path).tumour_mask.array.sum() == inside.sum()


def test_a_nifti_file_cut_short_is_refused_and_none_is_written_so(tmp_path: Path) -> None:
    """SimpleITK read a .nii.gz cut short with no error, the missing voxels as zeros (a
    prediction was made of half an image), and wrote one cut short on a full disk, saying
    nothing. Reading refuses it; writing leaves the whole new file or the one before."""
    vol = Volume(
        array=np.arange(8000, dtype=np.float32).reshape(20, 20, 20),
        spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3),
    )  # fmt: skip
    for name in ("v.nii.gz", "v.nii"):
        data = write_volume(vol, tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match=r"not readable: .*cut short"):
            read_volume(tmp_path / f"cut-{name}")
    # a folder where the file should go cannot be replaced: an error, and nothing is left
    (tmp_path / "busy.nii.gz").mkdir()
    with pytest.raises(OSError, match="Is a directory"):
        write_volume(vol, tmp_path / "busy.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_volume_round_trip_keeps_an_oblique_anisotropic_grid(tmp_path: Path) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    vol = Volume(
        array=np.arange(60, dtype=np.float32).reshape(3, 4, 5),
        spacing=(0.9, 1.1, 3.0),
        origin=(10.0, -20.0, 5.5),
        direction=direction,
    )
    back = read_volume(write_volume(vol, tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    mask = dataclasses.replace(vol, array=vol.array > 30)
    assert read_volume(write_volume(mask, tmp_path / "m.nii.gz")).array.sum() == 29
    with pytest.raises(InputError, match="expected a file"):
        read_volume(tmp_path / "absent.nii.gz")


def _relabelled(tiny_cohort: Cohort, to: Path, column: str, values: dict[str, str]) -> Path:
    """The tiny cohort with ``column`` recoded through ``values`` (a site's own codes)."""
    import csv

    to.mkdir()
    with (tiny_cohort[0] / "cohort.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row[column] = values.get(row[column], row[column])
        (to / row["patient_id"]).symlink_to(tiny_cohort[0] / row["patient_id"])
    with (to / "cohort.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return to


def test_unrecognised_outcome_labels_are_refused_naming_row_column_and_values(
    tmp_path: Path, tiny_cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table coded CR/PR/SD/PD or Short/Long used to be read silently: the response metrics
    counted no category, and every patient trained as the unguided class."""
    from inference.model_config import ModelConfig
    from inference.train.loops import TrainOptions, train_baseline
    from inference.unet_baseline import tiny_baseline_config

    records = tiny_cohort[1]
    codes = {"complete_response": "CR", "partial_response": "PR", "stable_disease": "SD",
             "progressive_disease": "PD"}  # fmt: skip
    coded = _relabelled(tiny_cohort, tmp_path / "coded", "response_category", codes)
    with pytest.raises(InputError) as err:
        read_cohort(coded)
    text = str(err.value)
    assert "3 outcome value(s) not recognised" in text
    first = records[0].values
    assert (
        f"cohort.csv, line 2 (patient {first['patient_id']}), column response_category: "
        "expected one of ['complete_response', 'partial_response', 'stable_disease', "
        f"'progressive_disease'], found {codes[first['response_category']]!r}"
    ) in text
    from inference.data import DEFAULT_SURVIVAL_CLASSES

    assert ModelConfig().survival_classes == DEFAULT_SURVIVAL_CLASSES
    titled = {c: c.title() for c in DEFAULT_SURVIVAL_CLASSES}
    short = _relabelled(tiny_cohort, tmp_path / "titled", "survival_class", titled)
    with pytest.raises(InputError) as err:
        read_cohort(short)
    assert (
        f"column survival_class: expected one of ['short', 'intermediate', 'long'], found "
        f"{titled[first['survival_class']]!r}"
    ) in str(err.value)
    # a model of its own classes reads them; None checks the response categories only
    assert len(read_cohort(short, survival_classes=tuple(titled.values()))) == len(records)
    assert len(read_cohort(short, survival_classes=None)) == len(records)
    with pytest.raises(InputError, match="column survival_class"):
        train_baseline([short], tmp_path / "m", tiny_baseline_config(),
                       TrainOptions(epochs=1, progress=False))  # fmt: skip
    pytest.importorskip("flwr")
    from dicom_node.cli import main

    assert main(["federate", "check-data", "--data", str(coded)]) == 2
    assert "column response_category: expected one of" in capsys.readouterr().err
    assert main(["federate", "check-data", "--data", str(short)]) == 2
    assert "column survival_class" in capsys.readouterr().err
    classes = ",".join(titled.values())
    assert (
        main(["federate", "check-data", "--data", str(short), "--survival-classes", classes]) == 0
    )
