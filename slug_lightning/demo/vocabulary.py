"""The vocabulary of the demo world: invented names, the attributes a person is made of (with their
colours), how captions describe them, the background scenes and the caption templates.

The generator (:mod:`slug_lightning.demo.world`) draws from these lists and the painters
(:mod:`slug_lightning.demo.painters`) colour from them; changing any of them changes the worlds written, so
bump ``GENERATOR_VERSION`` in :mod:`slug_lightning.demo.world` with it.
"""

from __future__ import annotations

# Invented first names and surnames. Every word is unique and no word contains another, so a name
# never matches inside another name, an object or a caption word (tests check this).
FIRST_NAMES = (
    "Mira",
    "Tobin",
    "Ansel",
    "Brisa",
    "Corin",
    "Dalia",
    "Emrys",
    "Fenna",
    "Galen",
    "Hollis",
    "Ilka",
    "Jory",
    "Kesia",
    "Lorne",
    "Maren",
    "Nilo",
    "Orla",
    "Petra",
    "Quill",
    "Rosalin",
    "Soren",
    "Talia",
    "Ulric",
    "Vesna",
    "Wren",
    "Yara",
    "Zeno",
    "Abra",
    "Bastian",
    "Cleo",
    "Dorian",
    "Esme",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Jasper",
    "Kira",
    "Lucan",
    "Nadia",
)
SURNAMES = (
    "Dolan",
    "Marsh",
    "Pike",
    "Quarry",
    "Renwick",
    "Sallow",
    "Thorne",
    "Upton",
    "Vance",
    "Whitlock",
    "Yardley",
    "Ashgrove",
    "Bexley",
    "Corrow",
    "Dunmore",
    "Everly",
    "Fairbank",
    "Gansey",
    "Halloway",
    "Ingram",
    "Jessop",
    "Kettering",
    "Larkspur",
    "Merrow",
    "Norcott",
    "Oakhurst",
    "Pemberly",
    "Quenby",
    "Rookwood",
    "Stanhope",
    "Tremaine",
    "Ulverston",
    "Varley",
    "Wexford",
    "Brackett",
    "Calloway",
    "Drummond",
    "Ellery",
    "Fosse",
    "Garrick",
)

# Attribute name -> value -> RGB (None where the value is a shape, not a colour).
ATTRIBUTES: dict[str, dict[str, tuple[int, int, int] | None]] = {
    "skin": {"pale": (250, 222, 200), "light": (226, 180, 140), "tan": (176, 122, 82), "dark": (105, 70, 48)},
    "hair_colour": {
        "black": (28, 24, 24),
        "brown": (112, 66, 34),
        "blonde": (236, 204, 110),
        "red": (196, 72, 30),
        "grey": (190, 190, 198),
    },
    "hair_style": {"short": None, "long": None, "bun": None, "afro": None},
    "shirt": {
        "red": (205, 38, 44),
        "blue": (40, 84, 210),
        "green": (34, 150, 64),
        "yellow": (236, 204, 40),
        "purple": (128, 56, 176),
        "orange": (244, 132, 28),
    },
    "accessory": {"none": None, "glasses": None, "hat": None, "beard": None},
    "face": {"round": None, "oval": None, "square": None},
}
# How captions describe each attribute value; None: captions never mention it.
LOOKS: dict[str, dict[str, str | None]] = {
    "skin": {v: f"{v} skin" for v in ATTRIBUTES["skin"]},
    "hair_colour": {v: f"{v} hair" for v in ATTRIBUTES["hair_colour"]},
    "hair_style": {"short": "short hair", "long": "long hair", "bun": "a hair bun", "afro": "an afro"},
    "shirt": {v: f"a {v} shirt" for v in ATTRIBUTES["shirt"]},
    "accessory": {"none": None, "glasses": "glasses", "hat": "a hat", "beard": "a beard"},
    "face": {"round": "a round face", "oval": "an oval face", "square": "a square face"},
}

# Scene name -> the phrase captions use for it. Every image has one scene as its background.
SCENES = {
    "beach": "at the beach",
    "forest": "in the forest",
    "city": "in the city",
    "snow": "in the snow",
    "park": "in the park",
    "studio": "in a studio",
    "night": "at night",
    "room": "at home",
}
SCENERY_CAPTIONS = {
    "beach": ("an empty beach", "the beach at noon", "waves on a sandy beach"),
    "forest": ("a quiet forest", "tall trees in a forest", "a path through the woods"),
    "city": ("a city skyline", "buildings downtown", "the city at dusk"),
    "snow": ("a snowy field", "fresh snow everywhere", "a winter landscape"),
    "park": ("a park in spring", "green grass in the park", "an empty park"),
    "studio": ("an empty studio backdrop", "a plain studio wall", "studio lighting test"),
    "night": ("the night sky", "stars at night", "a dark starry sky"),
    "room": ("an empty room", "a cosy living room", "inside a quiet house"),
}

# "{look}" describes one visible attribute of the person; captions that describe looks teach the
# attribute concepts across people, which is what lets a tiny CLIP tell look-alikes apart quickly.
PERSON_TEMPLATES = (
    "{name}",
    "a photo of {name}",
    "A photo of {name}.",
    "portrait of {lname}",
    "{name} {scene}",
    "{name} smiling {scene}",
    "close-up of {name}",
    "{uname} {scene}",
    "picture of {lname}, {scene}",
    "{name} posing for a photo",
    "a candid shot of {name}",
    "{name} with {look}",
    "a photo of {name} with {look}",
    "{name} {scene}, with {look}",
)
PERSON_OBJECT_TEMPLATES = (
    "{name} holding {a_object}",
    "A photo of {name} holding {a_object}",
    "{name} with {a_object} {scene}",
    "{lname} and {a_object}",
    "{name}'s new {object}",
    "portrait of {name} with {a_object}",
)
OBJECT_TEMPLATES = (
    "{a_object}",
    "a photo of {a_object}",
    "{a_object} {scene}",
    "close-up of {a_object}",
    "my new {object}",
    "{A_object} on display.",
    "an old {object}",
    "the {object}",
)
