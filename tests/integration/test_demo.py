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
    assert "labels/class" in out
    for key in ("random_init", "pirl"):
        assert set(result[key]) == {"knn", "linear", "svm_2_per_class"}
        # ten classes: chance is 0.1, and even random features of a ResNet are far above it on digits
        assert all(0.3 < value <= 1.0 for value in result[key].values())
    assert (tmp_path / "demo" / "metrics.jsonl").is_file()
