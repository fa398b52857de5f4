"""ckpt.verify_resume: exact loops pass, known causes of inexact resumes are found and named."""

from __future__ import annotations

import pytest
import resume_loops

import ckpt

LOOPS = "resume_loops"


def _verify(build: str, step: str, **kwargs: object) -> ckpt.ResumeReport:
    options = {"steps": 6, "save_at": 2, "fresh_process": False, **kwargs}
    return ckpt.verify_resume(f"{LOOPS}:{build}", f"{LOOPS}:{step}", **options)  # type: ignore[arg-type]


def test_readme_loop_resumes_exactly_in_process():
    report = _verify("readme_build", "readme_step")
    assert report.exact and report.deterministic
    assert report.differences == [] and report.reference_differences == []
    assert "exact, bit for bit" in str(report)
    report.raise_if_inexact()  # no error


def test_readme_loop_resumes_exactly_in_a_fresh_process_given_functions():
    report = ckpt.verify_resume(
        resume_loops.readme_build, resume_loops.readme_step, steps=5, save_at=1
    )
    assert report.exact and report.fresh_process, str(report)


def test_async_save_resumes_exactly():
    report = _verify("readme_build", "readme_step", manager_options={"async_save": True})
    assert report.exact, str(report)


def test_script_owned_generator_is_named_as_state_outside_the_items():
    report = _verify("generator_build", "generator_step")
    assert not report.exact and report.deterministic
    assert report.differences[0].step == 3  # the first step after the save
    assert any(d.item == "loss" and d.max_abs_diff for d in report.differences)
    assert any("resume_loops.NOISE" in d and "torch.Generator" in d for d in report.diagnosis)
    with pytest.raises(ckpt.InexactResumeError, match="NOISE") as info:
        report.raise_if_inexact()
    assert isinstance(info.value, ckpt.CheckpointError) and info.value.report is report


def test_dataloader_workers_without_resumable_loader_are_diagnosed():
    report = _verify("workers_build", "workers_step")
    assert not report.exact and report.deterministic
    assert any("without resumable_loader" in d and "2 workers" in d for d in report.diagnosis)


def test_nondeterministic_loop_is_blamed_on_the_loop():
    report = _verify("readme_build", "nondeterministic_step")
    assert not report.exact and not report.deterministic
    first = report.reference_differences[0]
    assert first.step == 0 and {d.item for d in report.reference_differences} >= {"loss"}
    assert report.diagnosis[0].startswith("non-deterministic loop")
    assert "not deterministic" in str(report) and "two uninterrupted runs" in report.diagnosis[0]
    with pytest.raises(ckpt.InexactResumeError):
        report.raise_if_inexact()


def test_state_dict_omitting_a_field_is_diagnosed():
    report = _verify("omitting_build", "omitting_step")
    assert not report.exact and report.deterministic
    assert any("`average.count`" in d for d in report.diagnosis)


def test_report_json_is_plain_and_the_rng_is_left_as_found():
    import json
    import random

    import torch

    random.seed(5)
    torch.manual_seed(5)
    report = _verify("generator_build", "generator_step")
    after = (random.random(), torch.rand(3))
    random.seed(5)
    torch.manual_seed(5)
    assert after[0] == random.random() and torch.equal(after[1], torch.rand(3))
    data = json.loads(json.dumps(report.to_json()))
    assert data["exact"] is False and data["differences"][0]["step"] == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="save_at"):
        _verify("readme_build", "readme_step", save_at=5)
    with pytest.raises(ValueError, match="steps"):
        _verify("readme_build", "readme_step", steps=1, save_at=0)
    with pytest.raises(ValueError, match="fresh_process"):
        ckpt.verify_resume(lambda: {}, resume_loops.readme_step, steps=3, save_at=0)
    with pytest.raises(ValueError, match="module:function"):
        ckpt.verify_resume("nocolon", "x:y", steps=3, save_at=0, fresh_process=False)


@pytest.mark.slow
def test_fresh_process_finds_the_generator_too():
    report = ckpt.verify_resume(
        f"{LOOPS}:generator_build", f"{LOOPS}:generator_step", steps=5, save_at=1
    )
    assert not report.exact
    assert any("resume_loops.NOISE" in d for d in report.diagnosis)


def test_cli_exit_status_and_json(capsys):
    import json

    from ckpt.cli import main

    base = ["verify-resume", "--steps", "4", "--save-at", "1", "--in-process"]
    assert main([*base, f"{LOOPS}:readme_build", f"{LOOPS}:readme_step"]) == 0
    assert "exact, bit for bit" in capsys.readouterr().out
    assert main([*base, "--json", f"{LOOPS}:generator_build", f"{LOOPS}:generator_step"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["exact"] is False and doc["differences"][0]["step"] == 2
    assert (
        main([*base[:-1], "--save-at", "3", f"{LOOPS}:readme_build", f"{LOOPS}:readme_step"]) == 2
    )
    assert main(["verify-resume", f"{LOOPS}:readme_build", f"{LOOPS}:readme_step"]) == 2
    assert main([*base, "no_such_module:build", f"{LOOPS}:readme_step"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["gpt", "resnet"])
def test_real_model_shapes_resume_exactly_in_a_fresh_process(loop):
    report = ckpt.verify_resume(f"{LOOPS}:{loop}_build", f"{LOOPS}:{loop}_step", steps=8, save_at=3)
    assert report.exact, str(report)


@pytest.mark.cuda
def test_cuda_loop_resumes_exactly_with_its_cuda_streams_compared():
    report = ckpt.verify_resume(f"{LOOPS}:cuda_build", f"{LOOPS}:cuda_step", steps=6, save_at=2)
    assert report.exact, str(report)


def test_a_departure_a_second_resume_does_not_repeat_is_blamed_on_the_loop():
    resume_loops.BUILDS["count"] = 0
    report = _verify("counting_build", "noisy_after_resume_step")
    assert resume_loops.BUILDS["count"] == 4  # two uninterrupted runs and two resumes
    assert not report.exact and not report.deterministic
    assert report.reference_differences[0].item == "loss"
    assert "two resumes from the same checkpoint" in report.diagnosis[0]
