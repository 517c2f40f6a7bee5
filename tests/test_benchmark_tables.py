"""The pure functions behind benchmarks/multi_concept.py's tables: what the closing notes quote comes from them."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def multi_concept():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("multi_concept")
    finally:
        sys.path.remove(str(BENCHMARKS))


class _World:
    """Only what look_alike_change asks of a DemoWorld."""

    def __init__(self, look_alikes: dict[str, tuple[str, ...]]):
        self._look_alikes = look_alikes

    def look_alikes(self, person: str) -> tuple[str, ...]:
        return self._look_alikes[person]


def _report(forgotten, rows):
    return {
        "concepts": [{"name": name} for name in forgotten],
        "test_classes": {
            "identities": [
                {"name": name, "images": images, "top1_before": before, "top1_after": after}
                for name, images, before, after in rows
            ]
        },
    }


ROWS = [("Bo", 12, 1.0, 0.5), ("Cy", 12, 1.0, 0.75), ("Di", 24, 0.5, 0.5), ("Ed", 12, 0.5, 1.0)]


def test_look_alike_change_weights_each_class_by_its_images_over_the_whole_set(multi_concept):
    world = _World({"Al": ("Bo", "Ed")})
    # Bo: 12 images lose 0.5, Ed: 12 images gain 0.5; over 60 images, the two cancel
    assert multi_concept.look_alike_change(_report(["Al"], ROWS), world) == pytest.approx(0.0)
    world = _World({"Al": ("Bo",)})
    assert multi_concept.look_alike_change(_report(["Al"], ROWS), world) == pytest.approx(100 * -6 / 60)


def test_look_alike_parts_add_up_to_the_set_change_and_leave_the_forgotten_out(multi_concept):
    everyone = ("Bo", "Cy", "Di", "Ed")
    change = 100 * sum(images * (after - before) for _, images, before, after in ROWS) / 60
    assert multi_concept.look_alike_change(_report(["Al"], ROWS), _World({"Al": everyone})) == pytest.approx(change)
    # a forgotten person who looks like another forgotten one is not a look-alike left to count
    world = _World({"Al": ("Bo", "Zo"), "Zo": ("Al", "Cy")})
    rows = ROWS + [("Zo", 12, 1.0, 0.0)]  # not in real reports: the forget classes have no row
    assert multi_concept.look_alike_change(_report(["Al", "Zo"], rows), world) == pytest.approx(100 * -9 / 72)


def test_look_alike_change_is_none_without_per_class_rows(multi_concept):
    assert multi_concept.look_alike_change({"concepts": [{"name": "Al"}]}, _World({"Al": ("Bo",)})) is None


def test_the_target_admits_exactly_ten_points_and_nothing_more(multi_concept):
    assert multi_concept._within_target(-10.0)
    assert multi_concept._within_target(100 * (0.85 - 0.95))  # a float rounding above 10
    assert multi_concept._within_target(+3.0)
    assert not multi_concept._within_target(-10.1)
