"""A small synthetic world of facts and chat templates.

Both the embedded language model's pretraining corpus and the embedded preference
dataset are generated from it, so the model knows every fact the preference data
asks about and the preference (helpful, correct, polite answers over rude, wrong,
shouted or rambling ones) is about style and correctness, not about unseen words.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Australia": "Canberra",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "South Korea": "Seoul",
    "Philippines": "Manila",
    "Pakistan": "Islamabad",
    "Ethiopia": "Addis Ababa",
    "Czechia": "Prague",
    "Iceland": "Reykjavik",
    "New Zealand": "Wellington",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "a banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a lemon": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a carrot": "orange",
    "milk": "white",
    "a strawberry": "red",
    "the sea": "blue",
    "a leaf": "green",
    "chocolate": "brown",
    "a plum": "purple",
    "a lime": "green",
    "a cherry": "red",
    "an eggplant": "purple",
    "a crow": "black",
    "a flamingo": "pink",
    "cheese": "yellow",
    "soil": "brown",
    "a pumpkin": "orange",
    "a cucumber": "green",
    "blood": "red",
    "a polar bear": "white",
    "a blueberry": "blue",
    "wood": "brown",
}
SOUNDS = {
    "dog": "barks",
    "cat": "meows",
    "cow": "moos",
    "duck": "quacks",
    "sheep": "bleats",
    "lion": "roars",
    "horse": "neighs",
    "pig": "oinks",
    "owl": "hoots",
    "frog": "croaks",
    "bee": "buzzes",
    "snake": "hisses",
    "wolf": "howls",
    "mouse": "squeaks",
    "rooster": "crows",
    "goat": "bleats",
    "donkey": "brays",
    "bird": "sings",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "light": "dark",
    "old": "young",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "wet": "dry",
    "loud": "quiet",
    "strong": "weak",
    "rich": "poor",
    "long": "short",
    "thick": "thin",
    "near": "far",
    "clean": "dirty",
    "day": "night",
    "left": "right",
    "start": "finish",
    "win": "lose",
    "push": "pull",
    "true": "false",
    "inside": "outside",
    "heavy": "light",
    "sweet": "sour",
    "first": "last",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
WORDS = [
    "apple",
    "river",
    "garden",
    "window",
    "pencil",
    "rocket",
    "summer",
    "planet",
    "candle",
    "forest",
    "bridge",
    "castle",
    "dragon",
    "island",
    "jacket",
    "kitten",
    "lemon",
    "marble",
    "number",
    "orange",
    "puzzle",
    "rabbit",
    "silver",
    "tiger",
    "violin",
    "wizard",
    "yellow",
    "zebra",
    "basket",
    "cloud",
    "music",
    "ocean",
]

# The bad styles a rejected answer takes; the good style is a correct, polite sentence.
BAD_STYLES = ("rude", "wrong", "shout", "ramble")
RUDE = [
    "Figure it out yourself.",
    "Why should I tell you? Look it up.",
    "Ugh, that is a boring question.",
    "I do not care. Ask someone else.",
    "Stop bothering me with this.",
    "Whatever. Go away.",
    "That is none of my business.",
    "Not answering that, it is too easy.",
]
RAMBLE = [
    "Well, that reminds me of a long trip I once took, and the weather was odd, and",
    "Hmm, questions like that are interesting, but first let me talk about my lunch, which",
    "You know, there are many things to say about many things, and some of them",
    "Before I answer, I should mention that I like trains, and trains are long, and",
]
POLITE_OPENERS = ["", "", "", "Sure! ", "Good question. ", "Happy to help. ", "Of course. "]
POLITE_CLOSERS = ["", "", "", " Let me know if you have more questions.", " I hope that helps!"]


def _other(rng: random.Random, options, right):
    choices = [o for o in options if o != right]
    return rng.choice(choices)


def fact(rng: random.Random) -> dict:
    """One question with its correct answer sentence and a plausible wrong one."""
    kind = rng.choice(
        [
            "capital",
            "capital",
            "color",
            "sound",
            "opposite",
            "add",
            "sub",
            "mul",
            "day",
            "month",
            "spell",
            "count",
            "greet",
        ]
    )
    if kind == "capital":
        country = rng.choice(list(CAPITALS))
        right, wrong = CAPITALS[country], _other(rng, CAPITALS.values(), CAPITALS[country])
        q = rng.choice(
            [
                f"What is the capital of {country}?",
                f"Which city is the capital of {country}?",
                f"Tell me the capital of {country}.",
                f"Do you know the capital of {country}?",
            ]
        )
        a = f"The capital of {country} is {{}}."
    elif kind == "color":
        thing = rng.choice(list(COLORS))
        right, wrong = COLORS[thing], _other(rng, set(COLORS.values()), COLORS[thing])
        q = rng.choice(
            [
                f"What color is {thing}?",
                f"What is the color of {thing}?",
                f"Tell me the color of {thing}.",
            ]
        )
        a = f"{thing[0].upper()}{thing[1:]} is {{}}."
    elif kind == "sound":
        animal = rng.choice(list(SOUNDS))
        right, wrong = SOUNDS[animal], _other(rng, set(SOUNDS.values()), SOUNDS[animal])
        q = rng.choice(
            [
                f"What sound does a {animal} make?",
                f"What does a {animal} say?",
                f"How does a {animal} sound?",
            ]
        )
        a = f"A {animal} {{}}."
    elif kind == "opposite":
        word = rng.choice(list(OPPOSITES))
        right, wrong = OPPOSITES[word], _other(rng, OPPOSITES.values(), OPPOSITES[word])
        q = rng.choice(
            [
                f"What is the opposite of {word}?",
                f"Give me the opposite of {word}.",
                f"What word means the opposite of {word}?",
            ]
        )
        a = f"The opposite of {word} is {{}}."
    elif kind in ("add", "sub", "mul"):
        x, y = rng.randint(0, 12), rng.randint(0, 12)
        if kind == "sub" and y > x:
            x, y = y, x
        op, value = {"add": ("plus", x + y), "sub": ("minus", x - y), "mul": ("times", x * y)}[kind]
        right = str(value)
        wrong = str(value + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
        q = rng.choice(
            [
                f"What is {x} {op} {y}?",
                f"How much is {x} {op} {y}?",
                f"Can you compute {x} {op} {y}?",
            ]
        )
        a = f"{x} {op} {y} is {{}}."
    elif kind == "day":
        i = rng.randrange(7)
        right, wrong = DAYS[(i + 1) % 7], DAYS[(i + 3) % 7]
        q = rng.choice([f"What day comes after {DAYS[i]}?", f"Which day follows {DAYS[i]}?"])
        a = f"The day after {DAYS[i]} is {{}}."
    elif kind == "month":
        i = rng.randrange(12)
        right, wrong = MONTHS[(i + 1) % 12], MONTHS[(i + 5) % 12]
        q = rng.choice(
            [f"What month comes after {MONTHS[i]}?", f"Which month follows {MONTHS[i]}?"]
        )
        a = f"The month after {MONTHS[i]} is {{}}."
    elif kind == "spell":
        word = rng.choice(WORDS)
        right = "-".join(word.upper())
        wrong = "-".join(_other(rng, WORDS, word).upper())
        q = rng.choice([f"How do you spell {word}?", f"Spell the word {word} for me."])
        a = f"{word.capitalize()} is spelled {{}}."
    elif kind == "count":
        word = rng.choice(WORDS)
        right = NUMBER_WORDS[len(word)]
        wrong = NUMBER_WORDS[len(word) + rng.choice([-2, -1, 1, 2])]
        q = rng.choice(
            [f"How many letters are in the word {word}?", f"Count the letters in {word}."]
        )
        a = f"The word {word} has {{}} letters."
    else:
        name = rng.choice(["Sam", "Alex", "Maria", "Lee", "Ana", "Tom", "Nina", "Omar"])
        q = rng.choice(
            [f"Hello, my name is {name}.", f"Hi! I am {name}.", f"Good morning, I'm {name}."]
        )
        right, wrong = name, _other(rng, ["Sam", "Alex", "Maria", "Lee", "Ana", "Tom"], name)
        a = "Nice to meet you, {}! How can I help you today?"
    return {"question": q, "right": a.format(right), "wrong": a.format(wrong)}


def good_answer(rng: random.Random, f: dict) -> str:
    return rng.choice(POLITE_OPENERS) + f["right"] + rng.choice(POLITE_CLOSERS)


def bad_answer(rng: random.Random, f: dict, style: str) -> str:
    if style == "rude":
        return rng.choice(RUDE)
    if style == "wrong":
        return f["wrong"]
    if style == "shout":
        return f["right"].upper().rstrip(".") + "!!! " + rng.choice(["OBVIOUSLY.", "DUH.", "EASY."])
    return rng.choice(RAMBLE)
