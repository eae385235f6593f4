"""Write the bundled sample data set (mlx_surgical/samples/*.jsonl) from the table below.

Run as:
    python scripts/build_sample_data.py

Each entry is one small Python function, written for this project, and becomes four
instruction/response pairs: write it, explain it, fix a bug in it, and test it. The split
into train/valid/test is by function, so held-out prompts ask about functions the model
never saw. The output is committed; re-running reproduces it byte for byte.
"""

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "mlx_surgical" / "samples"

# (name, what it does, code, buggy code, what the bug is, test)
FUNCTIONS = [
    (
        "add_numbers", "returns the sum of two numbers",
        "def add_numbers(a, b):\n    return a + b",
        "def add_numbers(a, b):\n    return a - b",
        "it subtracts instead of adding",
        "def test_add_numbers():\n    assert add_numbers(2, 3) == 5\n    assert add_numbers(-1, 1) == 0",
    ),
    (
        "is_even", "tells whether an integer is even",
        "def is_even(n):\n    return n % 2 == 0",
        "def is_even(n):\n    return n % 2 == 1",
        "it tests for a remainder of 1, which is the odd case",
        "def test_is_even():\n    assert is_even(4)\n    assert not is_even(7)",
    ),
    (
        "reverse_string", "returns a string reversed",
        "def reverse_string(text):\n    return text[::-1]",
        "def reverse_string(text):\n    return text[::1]",
        "the slice step is 1, so the string comes back unchanged",
        "def test_reverse_string():\n    assert reverse_string(\"abc\") == \"cba\"\n    assert reverse_string(\"\") == \"\"",
    ),
    (
        "factorial", "computes n factorial for a non-negative integer n",
        "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
        "def factorial(n):\n    result = 1\n    for i in range(2, n):\n        result *= i\n    return result",
        "the range stops before n, so n itself is never multiplied in",
        "def test_factorial():\n    assert factorial(0) == 1\n    assert factorial(5) == 120",
    ),
    (
        "fibonacci", "returns the n-th Fibonacci number, with fibonacci(0) equal to 0",
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a = b\n        b = a + b\n    return a",
        "the two assignments run one after the other, so b doubles instead of adding the old a",
        "def test_fibonacci():\n    assert fibonacci(0) == 0\n    assert fibonacci(1) == 1\n    assert fibonacci(10) == 55",
    ),
    (
        "is_palindrome", "tells whether a string reads the same forwards and backwards, ignoring case",
        "def is_palindrome(text):\n    lowered = text.lower()\n    return lowered == lowered[::-1]",
        "def is_palindrome(text):\n    return text == text[::-1]",
        "it compares without lowering the case, so \"Level\" is rejected",
        "def test_is_palindrome():\n    assert is_palindrome(\"Level\")\n    assert not is_palindrome(\"python\")",
    ),
    (
        "count_vowels", "counts the vowels in a string",
        "def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in \"aeiou\")",
        "def count_vowels(text):\n    return sum(1 for ch in text if ch in \"aeiou\")",
        "capital vowels are missed because the text is not lowered first",
        "def test_count_vowels():\n    assert count_vowels(\"Apple\") == 2\n    assert count_vowels(\"xyz\") == 0",
    ),
    (
        "max_of_list", "returns the largest item of a non-empty list",
        "def max_of_list(items):\n    best = items[0]\n    for item in items[1:]:\n        if item > best:\n            best = item\n    return best",
        "def max_of_list(items):\n    best = 0\n    for item in items:\n        if item > best:\n            best = item\n    return best",
        "it starts from 0, so a list of negative numbers returns 0",
        "def test_max_of_list():\n    assert max_of_list([3, 9, 2]) == 9\n    assert max_of_list([-5, -2]) == -2",
    ),
    (
        "flatten", "flattens a list of lists into one list",
        "def flatten(nested):\n    return [item for inner in nested for item in inner]",
        "def flatten(nested):\n    return [inner for inner in nested]",
        "it copies the inner lists instead of their items",
        "def test_flatten():\n    assert flatten([[1, 2], [3]]) == [1, 2, 3]\n    assert flatten([]) == []",
    ),
    (
        "unique_items", "removes duplicates from a list while keeping the first occurrence order",
        "def unique_items(items):\n    seen = set()\n    result = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n            result.append(item)\n    return result",
        "def unique_items(items):\n    return list(set(items))",
        "a set does not keep the order of the items",
        "def test_unique_items():\n    assert unique_items([3, 1, 3, 2, 1]) == [3, 1, 2]",
    ),
    (
        "word_count", "counts how often each word appears in a sentence",
        "def word_count(sentence):\n    counts = {}\n    for word in sentence.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts",
        "def word_count(sentence):\n    counts = {}\n    for word in sentence.split():\n        counts[word] = 1\n    return counts",
        "it sets every count to 1 instead of adding to it",
        "def test_word_count():\n    assert word_count(\"a b a\") == {\"a\": 2, \"b\": 1}",
    ),
    (
        "clamp", "limits a value to the range between low and high",
        "def clamp(value, low, high):\n    return max(low, min(value, high))",
        "def clamp(value, low, high):\n    return min(low, max(value, high))",
        "min and max are swapped, so the result is always low",
        "def test_clamp():\n    assert clamp(5, 0, 10) == 5\n    assert clamp(-3, 0, 10) == 0\n    assert clamp(42, 0, 10) == 10",
    ),
    (
        "celsius_to_fahrenheit", "converts a temperature from Celsius to Fahrenheit",
        "def celsius_to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32",
        "def celsius_to_fahrenheit(celsius):\n    return celsius * 5 / 9 + 32",
        "the ratio is inverted; Celsius to Fahrenheit multiplies by 9/5",
        "def test_celsius_to_fahrenheit():\n    assert celsius_to_fahrenheit(0) == 32\n    assert celsius_to_fahrenheit(100) == 212",
    ),
    (
        "chunk_list", "splits a list into chunks of a given size",
        "def chunk_list(items, size):\n    return [items[i:i + size] for i in range(0, len(items), size)]",
        "def chunk_list(items, size):\n    return [items[i:i + size] for i in range(0, len(items) - size, size)]",
        "the range stops too early and drops the last chunk",
        "def test_chunk_list():\n    assert chunk_list([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]",
    ),
    (
        "merge_dicts", "merges two dictionaries, with values from the second winning",
        "def merge_dicts(first, second):\n    merged = dict(first)\n    merged.update(second)\n    return merged",
        "def merge_dicts(first, second):\n    first.update(second)\n    return first",
        "it changes the caller's first dictionary in place",
        "def test_merge_dicts():\n    a = {\"x\": 1}\n    assert merge_dicts(a, {\"x\": 2, \"y\": 3}) == {\"x\": 2, \"y\": 3}\n    assert a == {\"x\": 1}",
    ),
    (
        "binary_search", "finds the index of a target in a sorted list, or returns -1",
        "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n    while low <= high:\n        mid = (low + high) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n            low = mid + 1\n        else:\n            high = mid - 1\n    return -1",
        "def binary_search(items, target):\n    low, high = 0, len(items) - 1\n    while low < high:\n        mid = (low + high) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n            low = mid + 1\n        else:\n            high = mid - 1\n    return -1",
        "the loop condition low < high skips the last candidate, so a one-item list is never searched",
        "def test_binary_search():\n    assert binary_search([1, 3, 5, 7], 5) == 2\n    assert binary_search([4], 4) == 0\n    assert binary_search([1, 2], 9) == -1",
    ),
    (
        "is_prime", "tells whether an integer is a prime number",
        "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True",
        "def is_prime(n):\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True",
        "it has no check for numbers below 2, so 0 and 1 are called prime",
        "def test_is_prime():\n    assert is_prime(13)\n    assert not is_prime(1)\n    assert not is_prime(21)",
    ),
    (
        "gcd", "returns the greatest common divisor of two integers",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return abs(a)",
        "def gcd(a, b):\n    while b:\n        a, b = a % b, b\n    return abs(a)",
        "the pair is not swapped, so the loop never ends when b is not zero",
        "def test_gcd():\n    assert gcd(12, 18) == 6\n    assert gcd(7, 0) == 7",
    ),
    (
        "capitalize_words", "capitalizes the first letter of every word in a sentence",
        "def capitalize_words(sentence):\n    return \" \".join(word[:1].upper() + word[1:] for word in sentence.split(\" \"))",
        "def capitalize_words(sentence):\n    return \" \".join(word.upper() for word in sentence.split(\" \"))",
        "it upper-cases whole words instead of only their first letter",
        "def test_capitalize_words():\n    assert capitalize_words(\"hello big world\") == \"Hello Big World\"",
    ),
    (
        "safe_divide", "divides two numbers and returns None when the divisor is zero",
        "def safe_divide(a, b):\n    if b == 0:\n        return None\n    return a / b",
        "def safe_divide(a, b):\n    if a == 0:\n        return None\n    return a / b",
        "it checks the numerator, so dividing by zero still raises",
        "def test_safe_divide():\n    assert safe_divide(6, 3) == 2\n    assert safe_divide(1, 0) is None",
    ),
    (
        "read_lines", "reads a text file and returns its lines without trailing newlines",
        "def read_lines(path):\n    with open(path, encoding=\"utf-8\") as handle:\n        return [line.rstrip(\"\\n\") for line in handle]",
        "def read_lines(path):\n    handle = open(path)\n    return handle.readlines()",
        "the file is never closed and the newlines are kept",
        "def test_read_lines(tmp_path):\n    path = tmp_path / \"a.txt\"\n    path.write_text(\"one\\ntwo\\n\")\n    assert read_lines(path) == [\"one\", \"two\"]",
    ),
    (
        "average", "returns the mean of a list of numbers, or 0.0 for an empty list",
        "def average(numbers):\n    if not numbers:\n        return 0.0\n    return sum(numbers) / len(numbers)",
        "def average(numbers):\n    return sum(numbers) / len(numbers)",
        "an empty list divides by zero",
        "def test_average():\n    assert average([1, 2, 3]) == 2\n    assert average([]) == 0.0",
    ),
    (
        "running_total", "returns the running totals of a list of numbers",
        "def running_total(numbers):\n    totals = []\n    total = 0\n    for number in numbers:\n        total += number\n        totals.append(total)\n    return totals",
        "def running_total(numbers):\n    totals = []\n    for number in numbers:\n        total = 0\n        total += number\n        totals.append(total)\n    return totals",
        "the total is reset to 0 inside the loop, so nothing accumulates",
        "def test_running_total():\n    assert running_total([1, 2, 3]) == [1, 3, 6]",
    ),
    (
        "count_words_in_file", "counts the words in a text file",
        "def count_words_in_file(path):\n    with open(path, encoding=\"utf-8\") as handle:\n        return len(handle.read().split())",
        "def count_words_in_file(path):\n    with open(path, encoding=\"utf-8\") as handle:\n        return len(handle.read().split(\" \"))",
        "splitting on a single space counts newlines and double spaces wrongly",
        "def test_count_words_in_file(tmp_path):\n    path = tmp_path / \"w.txt\"\n    path.write_text(\"one two\\nthree\")\n    assert count_words_in_file(path) == 3",
    ),
    (
        "sort_by_length", "sorts a list of strings from shortest to longest",
        "def sort_by_length(words):\n    return sorted(words, key=len)",
        "def sort_by_length(words):\n    return sorted(words)",
        "it sorts alphabetically because no key is given",
        "def test_sort_by_length():\n    assert sort_by_length([\"ccc\", \"a\", \"bb\"]) == [\"a\", \"bb\", \"ccc\"]",
    ),
    (
        "parse_int", "turns a string into an integer and returns a default when it cannot",
        "def parse_int(text, default=0):\n    try:\n        return int(text)\n    except ValueError:\n        return default",
        "def parse_int(text, default=0):\n    try:\n        return int(text)\n    except TypeError:\n        return default",
        "int raises ValueError for bad text, which the TypeError handler does not catch",
        "def test_parse_int():\n    assert parse_int(\"42\") == 42\n    assert parse_int(\"forty\", -1) == -1",
    ),
    (
        "last_n", "returns the last n items of a list",
        "def last_n(items, n):\n    if n <= 0:\n        return []\n    return items[-n:]",
        "def last_n(items, n):\n    return items[-n:]",
        "for n equal to 0 the slice items[-0:] returns the whole list",
        "def test_last_n():\n    assert last_n([1, 2, 3], 2) == [2, 3]\n    assert last_n([1, 2, 3], 0) == []",
    ),
    (
        "group_by_first_letter", "groups words into a dictionary keyed by their first letter",
        "def group_by_first_letter(words):\n    groups = {}\n    for word in words:\n        groups.setdefault(word[0], []).append(word)\n    return groups",
        "def group_by_first_letter(words):\n    groups = {}\n    for word in words:\n        groups[word[0]] = [word]\n    return groups",
        "each word replaces the group instead of joining it",
        "def test_group_by_first_letter():\n    assert group_by_first_letter([\"apple\", \"avocado\", \"bean\"]) == {\"a\": [\"apple\", \"avocado\"], \"b\": [\"bean\"]}",
    ),
    (
        "append_item", "appends an item to a list that defaults to a new empty list",
        "def append_item(item, items=None):\n    if items is None:\n        items = []\n    items.append(item)\n    return items",
        "def append_item(item, items=[]):\n    items.append(item)\n    return items",
        "the default list is created once and shared between calls",
        "def test_append_item():\n    assert append_item(1) == [1]\n    assert append_item(2) == [2]",
    ),
    (
        "to_snake_case", "converts a CamelCase name to snake_case",
        "def to_snake_case(name):\n    out = []\n    for i, ch in enumerate(name):\n        if ch.isupper() and i > 0:\n            out.append(\"_\")\n        out.append(ch.lower())\n    return \"\".join(out)",
        "def to_snake_case(name):\n    out = []\n    for ch in name:\n        if ch.isupper():\n            out.append(\"_\")\n        out.append(ch.lower())\n    return \"\".join(out)",
        "it also adds an underscore before the first capital letter",
        "def test_to_snake_case():\n    assert to_snake_case(\"HttpServer\") == \"http_server\"\n    assert to_snake_case(\"x\") == \"x\"",
    ),
]

WRITE_PHRASES = ["Write a Python function `{name}` that {what}.", "Implement `{name}` in Python: it {what}."]
EXPLAIN_PHRASES = ["Explain what this Python function does:\n\n{code}", "What does this code do?\n\n{code}"]


def imperative(what):
    """'returns the sum' -> 'return the sum': every description starts with a verb in -s."""
    verb, rest = what.split(" ", 1)
    return f"{verb[:-1]} {rest}"


def pairs_for(entry, rng):
    name, what, code, buggy, bug, test = entry
    fence = "```python\n{}\n```"
    return [
        {
            "instruction": rng.choice(WRITE_PHRASES).format(name=name, what=what),
            "response": "Here is the function:\n\n" + fence.format(code) + f"\n\n`{name}` {what}.",
        },
        {
            "instruction": rng.choice(EXPLAIN_PHRASES).format(code=fence.format(code)),
            "response": f"The function `{name}` {what}. It takes its arguments, computes the result "
            "without changing them, and returns it.",
        },
        {
            "instruction": f"Fix the bug in this function, which should {imperative(what)}:\n\n"
            + fence.format(buggy),
            "response": f"The bug: {bug}. Corrected:\n\n" + fence.format(code),
        },
        {
            "instruction": "Write a pytest test for this function:\n\n" + fence.format(code),
            "response": "A test that checks ordinary and edge cases:\n\n" + fence.format(test),
        },
    ]


def main():
    rng = random.Random(20261123)
    order = list(range(len(FUNCTIONS)))
    rng.shuffle(order)
    splits = {"valid": order[:2], "test": order[2:4], "train": order[4:]}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for split, indices in splits.items():
        rows = [pair for i in sorted(indices) for pair in pairs_for(FUNCTIONS[i], rng)]
        path = OUT_DIR / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
