"""The embedded corpus: seeded synthetic English about a small fictional world, for fully offline runs.

The world is a cast of people, each known by a first name, who live in one of a dozen invented towns
(Ashford, Brightwater, ...). A person has a job, a pet (an animal with a colour and a name), a favourite
food and colour, an age and a best friend. Two people described together may share a town and are compared
by age ("Mara is older than Tomas."). Every text is built from a few hundred word types and a handful of
paraphrase templates per fact, so a ~1M-parameter model learns it on a CPU in minutes and its perplexity
visibly falls.

Uses:
  * :func:`text_documents`: short paragraphs for language modelling, sometimes with an arithmetic fact
    ("Seven plus five is twelve." or "7 plus 5 is 12.");
  * :func:`qa_examples`: SQuAD-shaped extractive QA (context, question, answer span), also the raw material
    for preference pairs (corrupt the gold answer to get a rejected one);
  * :func:`arithmetic_problems`: prompts with a checkable answer, for RL with verifiable rewards;
  * :func:`arithmetic_statements`: the documents' sums cut before the result, raw text with a checkable answer;
  * :func:`dialogs`: a customer asks an assistant about a person, who describes them and answers follow-ups;
  * :func:`bilingual_pairs`: sentences paired with their rendering in a synthetic language
    (:func:`to_synthetic_language`), for translation-style data;
  * :func:`default_tokenizer_path`: the byte-level BPE tokenizer trained on this corpus by
    ``python -m lit_distill train-tokenizer`` and shipped with the package.

Each person's facts are sampled once and both the paragraph and the questions are rendered from them, so a
document never contradicts itself (different documents describe different, independently sampled people).
Everything is drawn from ``random.Random(seed)``: the same arguments give the same data on any machine.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

# Names are split by pronoun so that "she"/"he" can stand in for a name that was just mentioned.
FEMALE_NAMES = ("Mara", "Lena", "Ada", "Nora", "Ivy", "Elsa", "Rosa", "Tara", "Greta", "Hana", "Iris", "Julia",
                "Kira", "Lucy", "Mina", "Olga", "Petra", "Sofia", "Vera", "Wanda")
MALE_NAMES = ("Tomas", "Ben", "Carl", "Dario", "Emil", "Felix", "Hugo", "Ivan", "Jonas", "Karl", "Leo", "Marco",
              "Nils", "Omar", "Paul", "Rudi", "Sam", "Theo", "Viktor", "Yusuf")
CITIES = ("Ashford", "Brightwater", "Elmstead", "Fernhill", "Greyport", "Highmoor", "Kingsbridge", "Lakeside",
          "Millbrook", "Northgate", "Oakridge", "Redcliff")
JOBS = ("baker", "teacher", "doctor", "farmer", "painter", "nurse", "pilot", "cook", "engineer", "artist",
        "gardener", "writer", "singer", "driver", "fisher", "builder")
ANIMALS = ("cat", "dog", "rabbit", "parrot", "horse", "turtle", "hamster", "goat")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple")
PET_NAMES = ("Biscuit", "Pepper", "Luna", "Max", "Daisy", "Shadow", "Coco", "Milo", "Pip", "Rocky", "Ginger",
             "Bella", "Oscar", "Willow", "Ziggy", "Toffee")
FOODS = ("bread", "rice", "soup", "pasta", "cheese", "apples", "pears", "pizza", "noodles", "carrots", "honey",
         "cake", "apple pie", "fish soup", "fried eggs", "lemon cake")
NAMES = FEMALE_NAMES + MALE_NAMES
MIN_AGE, MAX_AGE = 18, 70

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
# Sums inside documents stay small so that their number words and digit strings add few word types.
DOCUMENT_MAX_OPERAND = 10

# Paraphrases per fact. {S} is the sentence subject and {P} its possessive, either the name ("Mara",
# "Mara's") or a pronoun ("She", "Her"); every other field appears at most once per template.
FACT_TEMPLATES = {
    "city": ("{S} lives in {city}.", "{P} home is in {city}.", "{S} has a house in {city}."),
    "job": ("{S} works as {a_job} {job}.", "{S} is {a_job} {job}.", "{S} earns a living as {a_job} {job}."),
    "pet": ("{S} has {a_pet_colour} {pet_colour} {animal} called {pet_name}.",
            "{S} owns {a_pet_colour} {pet_colour} {animal} named {pet_name}.",
            "{P} {animal} is {pet_colour}, and its name is {pet_name}."),
    "food": ("{P} favourite food is {food}.", "{S} likes to eat {food}.", "{S} loves {food} more than any other food."),
    "colour": ("{P} favourite colour is {colour}.", "{S} likes the colour {colour} best."),
    "age": ("{S} is {age} years old.", "{S} turned {age} this year."),
    "friend": ("{P} best friend is {friend}.", "{S} is best friends with {friend}."),
}
# Relations between the two people of a paragraph, over the fields name, other, city, older and younger.
RELATION_TEMPLATES = {
    "same_city": ("{name} and {other} both live in {city}.", "{name} and {other} are neighbours in {city}."),
    "older": ("{older} is older than {younger}.", "{younger} is younger than {older}."),
}
ARITHMETIC_TEMPLATES = ("{a} {op} {b} is {result}.", "{a} {op} {b} makes {result}.")

# (question, answer field) per fact; questions use the fields of the sentence that states the fact.
QUESTION_TEMPLATES = {
    "city": (("Where does {name} live?", "city"), ("In which town does {name} live?", "city")),
    "job": (("What is {name}'s job?", "job"), ("What does {name} do for a living?", "job")),
    "pet": (("What is the name of {name}'s {animal}?", "pet_name"), ("What pet does {name} have?", "animal"),
            ("What colour is {name}'s {animal}?", "pet_colour")),
    "food": (("What is {name}'s favourite food?", "food"), ("What does {name} like to eat?", "food")),
    "colour": (("What is {name}'s favourite colour?", "colour"),),
    "age": (("How old is {name}?", "age"),),
    "friend": (("Who is {name}'s best friend?", "friend"),),
    "same_city": (("Where does {name} live?", "city"), ("Where does {other} live?", "city")),
    "older": (("Who is older, {name} or {other}?", "older"), ("Who is older, {other} or {name}?", "older"),
              ("Who is younger, {name} or {other}?", "younger"), ("Who is younger, {other} or {name}?", "younger")),
}
ARITHMETIC_PROMPTS = ("What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Calculate {a} {op} {b}.")

# Dialog turns around the facts: the customer's opening question and the (customer, assistant) goodbyes.
DIALOG_OPENINGS = ("Can you tell me about {name}?", "What do you know about {name}?", "Hello! Who is {name}?")
DIALOG_CLOSINGS = (("Thank you!", "You are welcome."), ("Thanks, that helps.", "Glad I could help."))

# The synthetic language of :func:`bilingual_pairs`: a fixed letter substitution, vowel for vowel and consonant
# for consonant so that words stay pronounceable. It is the same for every seed (the language does not change,
# only the sentences do) and a bijection, so every English word has exactly one, learnable, rendering.
SYNTHETIC_LANGUAGE = "xx"
_VOWELS, _CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxyz"
_SUBSTITUTE = _VOWELS[2:] + _VOWELS[:2] + _CONSONANTS[7:] + _CONSONANTS[:7]
SYNTHETIC_ALPHABET = str.maketrans(_VOWELS + _CONSONANTS + (_VOWELS + _CONSONANTS).upper(),
                                   _SUBSTITUTE + _SUBSTITUTE.upper())


@dataclass(frozen=True)
class QAExample:
    """One extractive question: ``context[answer_start:answer_start + len(answer)] == answer``."""

    id: str
    context: str
    question: str
    answer: str
    answer_start: int


@dataclass(frozen=True)
class ArithmeticProblem:
    """A prompt whose answer can be checked exactly (the decimal string of the result)."""

    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Person:
    """All facts about one person; paragraphs and questions are both rendered from these."""

    name: str
    female: bool
    city: str
    job: str
    animal: str
    pet_colour: str
    pet_name: str
    food: str
    colour: str
    age: int
    friend: str

    def fields(self, use_pronoun: bool) -> dict[str, str]:
        """Template fields: the facts, the articles they need, and the subject {S} and possessive {P}."""
        subject, possessive = ("She", "Her") if self.female else ("He", "His")
        return {"S": subject if use_pronoun else self.name, "P": possessive if use_pronoun else self.name + "'s",
                "name": self.name, "city": self.city, "job": self.job, "a_job": article(self.job),
                "animal": self.animal, "pet_colour": self.pet_colour, "a_pet_colour": article(self.pet_colour),
                "pet_name": self.pet_name, "food": self.food, "colour": self.colour, "age": str(self.age),
                "friend": self.friend}


@dataclass(frozen=True)
class Sentence:
    """A rendered sentence, the fields it was rendered from and where each used field starts in it."""

    text: str
    fact: Optional[str] = None  # key of QUESTION_TEMPLATES; None for arithmetic
    fields: Mapping[str, str] = field(default_factory=dict)
    offsets: Mapping[str, int] = field(default_factory=dict)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 121 -> "one hundred and twenty-one"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    rest = n % 100
    return ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")


def render(template: str, fields: dict[str, str], fact: Optional[str] = None) -> Sentence:
    """Fill ``template`` and record the character offset of every field it uses."""
    used = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    offsets = {name: len(template[: template.index("{" + name + "}")].format_map(fields)) for name in used}
    return Sentence(template.format_map(fields), fact, fields, offsets)


class World:
    """Samples people, sentences about them and sums, all from one seeded RNG.

    Args:
        seed: seed of the private ``random.Random``; the same seed gives the same sequence of outputs.
    """

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def people(self, count: int) -> list[Person]:
        """``count`` people with distinct names; a later one may share the first one's town."""
        rng = self.rng
        names = rng.sample(NAMES, count + 1)  # one spare name so a friend can be outside the cast
        people = []
        for i, name in enumerate(names[:count]):
            city = people[0].city if i and rng.random() < 0.5 else rng.choice(CITIES)
            people.append(Person(name=name, female=name in FEMALE_NAMES, city=city, job=rng.choice(JOBS),
                                 animal=rng.choice(ANIMALS), pet_colour=rng.choice(COLOURS),
                                 pet_name=rng.choice(PET_NAMES), food=rng.choice(FOODS), colour=rng.choice(COLOURS),
                                 age=rng.randint(MIN_AGE, MAX_AGE),
                                 friend=rng.choice([other for other in names if other != name])))
        return people

    def describe(self, person: Person, num_facts: int) -> list[Sentence]:
        """``num_facts`` sentences about ``person``: the first names them, later ones may use a pronoun."""
        rng = self.rng
        facts = rng.sample(list(FACT_TEMPLATES), num_facts)
        # A sentence naming someone else goes last, so that a pronoun never follows it.
        facts.sort(key=lambda fact: fact == "friend")
        return [render(rng.choice(FACT_TEMPLATES[fact]), person.fields(use_pronoun=i > 0 and rng.random() < 0.5),
                       fact) for i, fact in enumerate(facts)]

    def relation(self, first: Person, second: Person) -> Optional[Sentence]:
        """A sentence relating two people (shared town or age order), or None if neither applies."""
        facts = [fact for fact, holds in (("same_city", first.city == second.city), ("older", first.age != second.age))
                 if holds]
        if not facts:
            return None
        fact = self.rng.choice(facts)
        older, younger = (first, second) if first.age > second.age else (second, first)
        fields = {"name": first.name, "other": second.name, "city": first.city, "older": older.name,
                  "younger": younger.name}
        return render(self.rng.choice(RELATION_TEMPLATES[fact]), fields, fact)

    def paragraph(self, num_sentences: int) -> list[Sentence]:
        """Facts about one person, or about two (at least two facts each) perhaps with a relation between them."""
        rng = self.rng
        if num_sentences < 5 or rng.random() < 0.5:
            (person,) = self.people(1)
            return self.describe(person, min(num_sentences, len(FACT_TEMPLATES)))
        first, second = self.people(2)
        relation = self.relation(first, second) if rng.random() < 0.7 else None
        budget = num_sentences - (relation is not None)
        num_first = rng.randint(2, budget - 2)
        return self.describe(first, num_first) + ([relation] if relation else []) + self.describe(
            second, budget - num_first)

    def arithmetic(self, max_operand: int) -> tuple[int, str, int, int]:
        """``(a, op, b, result)`` with operands in [0, max_operand] and a non-negative result."""
        rng = self.rng
        op = rng.choice(list(OPERATIONS))
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "minus" and a < b:
            a, b = b, a
        return a, op, b, OPERATIONS[op](a, b)

    def arithmetic_sentence(self) -> Sentence:
        """A small sum stated in words ("Seven plus five is twelve.") or digits ("7 plus 5 is 12.")."""
        a, op, b, result = self.arithmetic(DOCUMENT_MAX_OPERAND)
        template = self.rng.choice(ARITHMETIC_TEMPLATES)
        if self.rng.random() < 0.5:
            text = template.format(a=number_words(a), op=op, b=number_words(b), result=number_words(result))
            return Sentence(text[0].upper() + text[1:])
        return Sentence(template.format(a=a, op=op, b=b, result=result))


def join(sentences: list[Sentence]) -> str:
    return " ".join(s.text for s in sentences)


def _check_count(count: int, what: str) -> None:
    if count < 0:
        raise ValueError(f"{what} must be >= 0, got {count}")


def _check_max_operand(max_operand: int) -> None:
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")


def text_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Paragraphs of 3-8 sentences about one or two people; about a fifth end with one or two sums.

    Args:
        num_documents: how many documents to generate.
        seed: seed of the generator. Asking for more documents only appends to the list.

    Returns:
        ``num_documents`` strings, one paragraph each.
    """
    _check_count(num_documents, "num_documents")
    world = World(seed)
    documents = []
    for _ in range(num_documents):
        num_sentences = world.rng.randint(3, 8)
        num_sums = world.rng.randint(1, 2) if world.rng.random() < 0.2 else 0
        sentences = world.paragraph(num_sentences - num_sums)
        documents.append(join(sentences + [world.arithmetic_sentence() for _ in range(num_sums)]))
    return documents


def qa_examples(num_examples: int, seed: int = 0) -> list[QAExample]:
    """Extractive questions about a paragraph of 3-7 facts; the answer is a one- or two-word span of it.

    Args:
        num_examples: how many examples to generate.
        seed: seed of the generator. Asking for more examples only appends to the list.

    Returns:
        ``num_examples`` examples with ids ``"qa-{seed}-{i}"``.
    """
    _check_count(num_examples, "num_examples")
    world = World(seed)
    examples = []
    for i in range(num_examples):
        sentences = world.paragraph(world.rng.randint(3, 7))
        index = world.rng.randrange(len(sentences))
        sentence = sentences[index]
        question, answer_field = world.rng.choice(QUESTION_TEMPLATES[sentence.fact])
        # The answer is the value rendered into this sentence, located by offset rather than by searching the
        # context, where the same word may occur earlier (a red cat and a favourite colour red).
        answer_start = len(join(sentences[:index])) + (index > 0) + sentence.offsets[answer_field]
        examples.append(QAExample(f"qa-{seed}-{i}", join(sentences), question.format_map(sentence.fields),
                                  sentence.fields[answer_field], answer_start))
    return examples


def arithmetic_problems(num_problems: int, seed: int = 0, max_operand: int = 20) -> list[ArithmeticProblem]:
    """Addition, subtraction (never negative) and multiplication with operands in [0, max_operand].

    Args:
        num_problems: how many problems to generate.
        seed: seed of the generator. Asking for more problems only appends to the list.
        max_operand: largest operand.

    Returns:
        ``num_problems`` problems with ids ``"arith-{seed}-{i}"`` and decimal-string answers.
    """
    _check_count(num_problems, "num_problems")
    _check_max_operand(max_operand)
    world = World(seed)
    problems = []
    for i in range(num_problems):
        a, op, b, result = world.arithmetic(max_operand)
        prompt = world.rng.choice(ARITHMETIC_PROMPTS).format(a=a, op=op, b=b)
        problems.append(ArithmeticProblem(f"arith-{seed}-{i}", prompt, str(result)))
    return problems


def arithmetic_statements(num_statements: int, seed: int = 0,
                          max_operand: int = DOCUMENT_MAX_OPERAND) -> list[ArithmeticProblem]:
    """Sums in the digit style of :func:`text_documents`, cut before the result: ``"7 plus 5 is"`` -> ``"12"``.

    The prompt is raw text to continue (no question, no chat turn); in the documents it continues with
    ``" 12."``. Both document templates are used (``"... is"``, ``"... makes"``).

    Args:
        num_statements: how many statements to generate.
        seed: seed of the generator. Asking for more statements only appends to the list.
        max_operand: largest operand; documents use at most :data:`DOCUMENT_MAX_OPERAND`.

    Returns:
        ``num_statements`` problems with ids ``"stmt-{seed}-{i}"`` and decimal-string answers.
    """
    _check_count(num_statements, "num_statements")
    _check_max_operand(max_operand)
    world = World(seed)
    statements = []
    for i in range(num_statements):
        a, op, b, result = world.arithmetic(max_operand)
        template = world.rng.choice(ARITHMETIC_TEMPLATES)
        prompt = template[:template.index(" {result}")].format(a=a, op=op, b=b)
        statements.append(ArithmeticProblem(f"stmt-{seed}-{i}", prompt, str(result)))
    return statements


def dialogs(num_dialogs: int, seed: int = 0) -> list[list[str]]:
    """Customer/assistant dialogs about one person: the customer asks about them, the assistant describes 2-4
    facts, the customer asks 1-3 follow-up questions about those facts, each answered with a sentence stating the
    fact again, and both say goodbye. Every answer follows from the dialog itself.

    Args:
        num_dialogs: how many dialogs to generate.
        seed: seed of the generator. Asking for more dialogs only appends to the list.

    Returns:
        ``num_dialogs`` lists of turns (the DailyDialog shape), customer first, then alternating.
    """
    _check_count(num_dialogs, "num_dialogs")
    world = World(seed)
    rng = world.rng
    result = []
    for _ in range(num_dialogs):
        (person,) = world.people(1)
        description = world.describe(person, rng.randint(2, 4))
        turns = [rng.choice(DIALOG_OPENINGS).format(name=person.name), join(description)]
        for sentence in rng.sample(description, rng.randint(1, min(3, len(description)))):
            question, _ = rng.choice(QUESTION_TEMPLATES[sentence.fact])
            answer = render(rng.choice(FACT_TEMPLATES[sentence.fact]), person.fields(use_pronoun=rng.random() < 0.5))
            turns += [question.format_map(person.fields(use_pronoun=False)), answer.text]
        result.append(turns + list(rng.choice(DIALOG_CLOSINGS)))
    return result


def to_synthetic_language(text: str) -> str:
    """Render English in the synthetic language :data:`SYNTHETIC_LANGUAGE` (letters substituted, case, digits,
    spaces and punctuation kept): ``"Mara lives in Ashford."`` -> ``"Vizi tudob uw Ibqnazm."``."""
    return text.translate(SYNTHETIC_ALPHABET)


def bilingual_pairs(num_pairs: int, seed: int = 0, max_sentences: int = 3) -> list[dict[str, str]]:
    """Sentence-aligned pairs in the WMT/OPUS ``translation`` shape: 1 to ``max_sentences`` sentences about one
    person in English and in the synthetic language, ``{"en": ..., SYNTHETIC_LANGUAGE: ...}``.

    Args:
        num_pairs: how many pairs to generate.
        seed: seed of the generator (of the sentences; the synthetic language is the same for every seed). Asking
            for more pairs only appends to the list.
        max_sentences: most sentences per pair, at least 1.

    Returns:
        ``num_pairs`` dicts mapping language code to text.
    """
    _check_count(num_pairs, "num_pairs")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    world = World(seed)
    pairs = []
    for _ in range(num_pairs):
        english = join(world.paragraph(world.rng.randint(1, max_sentences)))
        pairs.append({"en": english, SYNTHETIC_LANGUAGE: to_synthetic_language(english)})
    return pairs


def default_tokenizer_path() -> str:
    """Absolute path of the shipped tokenizer directory (loadable with ``AutoTokenizer.from_pretrained``)."""
    return str(TOKENIZER_DIR)
