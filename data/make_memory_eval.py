"""Writes data/memory_eval.jsonl: held-out questions with paraphrases for the memory experiments.

Hand-written capitals, science, code and general questions (none of them in knowledge.jsonl),
plus arithmetic drawn from random.Random(11).  Each row: id, family, split, question,
paraphrases (two), answer, aliases, match, siblings (the same template with another slot
filler: a hard negative for the relevance gate, never asked).  ``split`` = "calib" for every third item (used only to
calibrate the relevance gate, ``ruvllm calibrate-relevance``) and "eval" for the rest (used by the
memory ablation and the retrieval bench), so the gate is never tuned on the questions it is scored on.

    python data/make_memory_eval.py
"""
import json
import random
from pathlib import Path

CAPITALS = [("Portugal", "Lisbon"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
            ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Finland", "Helsinki"),
            ("Denmark", "Copenhagen"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Colombia", "Bogota"),
            ("Cuba", "Havana"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("South Korea", "Seoul")]

# (family, question, paraphrase 1, paraphrase 2, answer, aliases, match)
FIXED = [
    ("science", "How many legs does a spider have?", "A spider has how many legs?",
     "What is the number of legs on a spider?", "8", [], "number"),
    ("science", "What is the freezing point of water in degrees Fahrenheit?",
     "At how many degrees Fahrenheit does water freeze?", "Water freezes at what temperature in Fahrenheit?",
     "32", [], "number"),
    ("science", "What is the chemical formula of water?", "Water has which chemical formula?",
     "Give the chemical formula for water.", "H2O", [], "text"),
    ("science", "What organ pumps blood through the human body?", "Which organ pumps blood around the body?",
     "In the human body, which organ pumps the blood?", "heart", [], "text"),
    ("science", "What is the hardest natural substance?", "Which natural substance is the hardest?",
     "Name the hardest naturally occurring material.", "diamond", [], "text"),
    ("science", "How many chromosomes does a human cell normally have?",
     "A normal human cell has how many chromosomes?", "What is the usual number of chromosomes in a human cell?",
     "46", [], "number"),
    ("science", "What force keeps the planets in orbit around the Sun?",
     "Which force holds the planets in their orbits around the Sun?",
     "The planets stay in orbit around the Sun because of which force?", "gravity", ["gravitation"], "text"),
    ("science", "What is the largest organ of the human body?", "Which organ of the human body is the largest?",
     "Name the biggest organ in the human body.", "skin", [], "text"),
    ("science", "What gas do humans need to breathe to stay alive?", "Which gas must humans breathe to survive?",
     "To stay alive, humans breathe in which gas?", "oxygen", [], "text"),
    ("science", "What is the chemical symbol for calcium?", "Calcium has which chemical symbol?",
     "Give the element symbol of calcium.", "Ca", [], "case"),
    ("science", "How many sides does a hexagon have?", "A hexagon has how many sides?",
     "What is the number of sides of a hexagon?", "6", [], "number"),
    ("science", "How many days are there in a leap year?", "A leap year has how many days?",
     "What is the number of days in a leap year?", "366", [], "number"),
    ("code", "In Python, what does len([1, 2, 3]) return?", "What is the value of len([1, 2, 3]) in Python?",
     "Python: len([1, 2, 3]) evaluates to what?", "3", [], "number"),
    ("code", "In Python, what is the value of 7 // 2?", "What does 7 // 2 evaluate to in Python?",
     "Python: what is the result of the expression 7 // 2?", "3", [], "number"),
    ("code", "In Python, what is the result of 2 ** 5?", "What does 2 ** 5 evaluate to in Python?",
     "Python: what value does the expression 2 ** 5 give?", "32", [], "number"),
    ("code", "Which keyword defines a function in Python?", "In Python, what keyword starts a function definition?",
     "What is the Python keyword for defining a function?", "def", [], "text"),
    ("code", "In Python, what does 'abc'.upper() return?", "What is the result of 'abc'.upper() in Python?",
     "Python: 'abc'.upper() evaluates to what?", "ABC", [], "case"),
    ("code", "What does HTML stand for?", "HTML is short for what?", "What is the full form of HTML?",
     "HyperText Markup Language", ["Hypertext Markup Language"], "text"),
    ("code", "In Python, what is the type of the value 3.5?", "What type does the value 3.5 have in Python?",
     "Python: type(3.5) is which type?", "float", [], "text"),
    ("code", "In Python, what does max([4, 9, 2]) return?", "What is the value of max([4, 9, 2]) in Python?",
     "Python: max([4, 9, 2]) evaluates to what?", "9", [], "number"),
    ("code", "Which Python keyword catches exceptions in a try statement?",
     "In a Python try statement, which keyword catches an exception?",
     "What keyword handles exceptions after try in Python?", "except", [], "text"),
    ("code", "In Python, what is the result of 10 % 3?", "What does 10 % 3 evaluate to in Python?",
     "Python: what value does 10 % 3 give?", "1", [], "number"),
    ("code", "What does SQL stand for?", "SQL is short for what?", "What is the full form of SQL?",
     "Structured Query Language", [], "text"),
    ("code", "In JavaScript, which keyword declares a block-scoped constant?",
     "Which JavaScript keyword declares a constant with block scope?",
     "What keyword makes a block-scoped constant in JavaScript?", "const", [], "text"),
    ("code", "What is the default port number of HTTP?", "HTTP uses which port number by default?",
     "By default, which port does HTTP listen on?", "80", [], "number"),
    ("general", "How many months of the year have 31 days?", "How many months have 31 days in a year?",
     "In a year, how many of the months are 31 days long?", "7", [], "number"),
    ("general", "How many players does a football (soccer) team have on the field?",
     "A soccer team fields how many players?", "How many players from one soccer team are on the pitch?",
     "11", [], "number"),
    ("general", "How many strings does a standard guitar have?", "A standard guitar has how many strings?",
     "What is the number of strings on a standard guitar?", "6", [], "number"),
    ("general", "Who wrote Romeo and Juliet?", "Romeo and Juliet was written by whom?",
     "Which writer is the author of Romeo and Juliet?", "Shakespeare", ["William Shakespeare"], "text"),
    ("general", "How many centimetres are in a metre?", "A metre has how many centimetres?",
     "What is the number of centimetres in one metre?", "100", [], "number"),
    ("general", "What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives which colour?",
     "Which colour results from mixing blue with yellow?", "green", [], "text"),
    ("general", "How many seconds are in a minute?", "A minute has how many seconds?",
     "What is the number of seconds in one minute?", "60", [], "number"),
]


# Hard negatives: the same template with another slot filler (the relevance gate must refuse these).
SIBLINGS = {
    "What is the chemical symbol for calcium?": "What is the chemical symbol for sodium?",
    "How many legs does a spider have?": "How many legs does an ant have?",
    "How many sides does a hexagon have?": "How many sides does an octagon have?",
    "What colour do you get by mixing blue and yellow?": "What colour do you get by mixing red and white?",
    "How many seconds are in a minute?": "How many minutes are in an hour?",
    "What organ pumps blood through the human body?": "What organ filters blood in the human body?",
    "Which keyword defines a function in Python?": "Which keyword defines a class in Python?",
    "What does HTML stand for?": "What does CSS stand for?",
    "What is the largest organ of the human body?": "What is the smallest bone of the human body?",
    "How many strings does a standard guitar have?": "How many strings does a violin have?",
    "What is the freezing point of water in degrees Fahrenheit?":
        "What is the boiling point of water in degrees Fahrenheit?",
    "How many chromosomes does a human cell normally have?": "How many chromosomes does a dog cell normally have?",
    "What gas do humans need to breathe to stay alive?": "What gas do plants need to make sugar?",
    "How many days are there in a leap year?": "How many days are there in a week?",
    "In Python, what does len([1, 2, 3]) return?": "In Python, what does sum([1, 2, 3]) return?",
    "What does SQL stand for?": "What does XML stand for?",
    "How many centimetres are in a metre?": "How many millimetres are in a metre?",
    "Who wrote Romeo and Juliet?": "Who wrote Pride and Prejudice?",
    "What is the default port number of HTTP?": "What is the default port number of HTTPS?",
    "In Python, what is the type of the value 3.5?": "In Python, what is the type of the value 'abc'?",
}


def arithmetic(rng: random.Random, n: int) -> list[tuple]:
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(12, 99), rng.randint(3, 9)
            gold, words = a * b, ("times", "Multiply {a} by {b}.")
        elif op == "+":
            a, b = rng.randint(21, 99), rng.randint(21, 99)
            gold, words = a + b, ("plus", "Add {a} and {b}.")
        else:
            a, b = rng.randint(50, 99), rng.randint(11, 49)
            gold, words = a - b, ("minus", "Subtract {b} from {a}.")
        rows.append(("arithmetic", f"What is {a} {op} {b}?", f"Compute {a} {words[0]} {b}.",
                     words[1].format(a=a, b=b) + " What is the result?", str(gold), [], "number"))
    return rows


def main() -> None:
    rows = [("capital", f"What is the capital of {c}?", f"Which city is the capital of {c}?",
             f"{c[0].upper() + c[1:]} has which city as its capital?", city,
             {"Bogota": ["Bogotá"]}.get(city, []), "text") for c, city in CAPITALS]
    rows += FIXED + arithmetic(random.Random(11), 20)
    out = Path(__file__).with_name("memory_eval.jsonl")
    with out.open("w", encoding="utf-8") as fh:
        for i, (family, q, p1, p2, answer, aliases, match) in enumerate(rows):
            fh.write(json.dumps({"id": f"{family}-{i:03d}", "family": family,
                                 "split": "calib" if i % 3 == 0 else "eval", "question": q,
                                 "paraphrases": [p1, p2], "answer": answer, "aliases": aliases,
                                 "match": match, "siblings": [SIBLINGS[q]] if q in SIBLINGS else []},
                                ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} items to {out}")


if __name__ == "__main__":
    main()
