import pytest

from pirl.demo import digits_sources, run_demo


def test_digits_sources_are_labelled_uint8_images():
    train, test = digits_sources()
    assert len(train) + len(test) == 1797 and train.num_classes == 10
    img = train.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)


@pytest.mark.slow
def test_demo_runs_offline_and_reports_before_and_after(tmp_path, capsys):
    result = run_demo(out=str(tmp_path / "demo"), epochs=1)
    out = capsys.readouterr().out
    assert "random init" in out and "PIRL" in out
    for key in ("random_init", "pirl"):
        assert 0.0 <= result[key]["knn"] <= 1.0 and 0.0 <= result[key]["linear"] <= 1.0
    assert (tmp_path / "demo" / "metrics.jsonl").is_file()
