"""The demo: a generated world of invented people and objects, and the commands that run SLUG on it.

- :mod:`slug_lightning.demo.world`: the demo world generator (:func:`make_demo_world`, :func:`load_demo_world`,
  :class:`DemoWorld`): LAION-style shards and labelled identity and object sets, seeded and byte-identical;
- :mod:`slug_lightning.demo.vocabulary`: the names, attributes, scenes and caption templates it draws from;
- :mod:`slug_lightning.demo.painters`: the numpy drawing of its images;
- :mod:`slug_lightning.demo.run`: ``python -m slug_lightning demo`` (:func:`run_demo`) and ``make-world``.
"""

from slug_lightning.demo.run import run_demo, unlearn_paths
from slug_lightning.demo.world import (
    GENERATOR_VERSION,
    IDENTITIES_DIR,
    INCOMPLETE_MARKER,
    OBJECTS_DIR,
    SHARDS_DIR,
    WORLD_FILE,
    DemoWorld,
    load_demo_world,
    make_demo_world,
)

__all__ = [
    "GENERATOR_VERSION",
    "IDENTITIES_DIR",
    "INCOMPLETE_MARKER",
    "OBJECTS_DIR",
    "SHARDS_DIR",
    "WORLD_FILE",
    "DemoWorld",
    "load_demo_world",
    "make_demo_world",
    "run_demo",
    "unlearn_paths",
]
