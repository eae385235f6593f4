"""The surgical report on a real model: 48 small Python problems in one house style, with tests.

Run as:
    python scripts/code_problems.py OUT_DIR --model MODEL_DIR
    mlx-surgical train OUT_DIR/surgical.json         # trains, then writes eval.json and eval.md

Writes OUT_DIR/code_train.jsonl (36 problems), OUT_DIR/code_heldout.jsonl (12: three of each
concept) and OUT_DIR/surgical.json (rank 8 on q/k/v, 5 epochs, the report at the end). Every
answer is in the style the adapter is to learn: a typed function with a docstring in a fenced
block, then a one-line example; every reference solution is checked against its tests here.
The README's SmolLM2-135M-Instruct figures come from this, with MODEL_DIR the float32 MLX
conversion of its GGUF (`mlx-surgical convert SmolLM2-135M-Instruct.Q4_1.gguf --bits none
--dtype float32`).
"""

import argparse
import json
from collections import Counter
from pathlib import Path

# (concept, function, parameters and return annotation, docstring, body, tests)
PROBLEMS = [
    ("strings", "reverse_words", "text: str) -> str",
     "Reverse the order of the words in text.",
     "return \" \".join(text.split()[::-1])",
     ["assert reverse_words('a b c') == 'c b a'", "assert reverse_words('hello') == 'hello'"]),
    ("strings", "count_vowels", "text: str) -> int",
     "Count the vowels in text, ignoring case.",
     "return sum(1 for ch in text.lower() if ch in \"aeiou\")",
     ["assert count_vowels('Hello World') == 3", "assert count_vowels('xyz') == 0"]),
    ("strings", "is_palindrome", "text: str) -> bool",
     "Whether text reads the same backwards, ignoring case and non-letters.",
     ("letters = [ch.lower() for ch in text if ch.isalnum()]\n"
      "    return letters == letters[::-1]"),
     ["assert is_palindrome('A man, a plan, a canal: Panama')", "assert not is_palindrome('hello')"]),
    ("strings", "capitalize_words", "text: str) -> str",
     "Capitalize the first letter of every word in text.",
     "return \" \".join(word[:1].upper() + word[1:] for word in text.split(\" \"))",
     ["assert capitalize_words('hello big world') == 'Hello Big World'"]),
    ("strings", "remove_spaces", "text: str) -> str",
     "Remove every space from text.",
     "return text.replace(\" \", \"\")",
     ["assert remove_spaces(' a b  c ') == 'abc'"]),
    ("strings", "char_frequency", "text: str) -> dict[str, int]",
     "Count how often each character occurs in text.",
     ("counts = {}\n"
      "    for ch in text:\n"
      "        counts[ch] = counts.get(ch, 0) + 1\n"
      "    return counts"),
     ["assert char_frequency('aab') == {'a': 2, 'b': 1}", "assert char_frequency('') == {}"]),
    ("strings", "longest_word", "text: str) -> str",
     "Return the longest word in text; the first one on a tie.",
     "return max(text.split(), key=len, default=\"\")",
     ["assert longest_word('a bbb cc') == 'bbb'", "assert longest_word('') == ''"]),
    ("strings", "is_anagram", "first: str, second: str) -> bool",
     "Whether the two strings are anagrams of each other, ignoring case.",
     "return sorted(first.lower()) == sorted(second.lower())",
     ["assert is_anagram('Listen', 'Silent')", "assert not is_anagram('abc', 'abd')"]),
    ("strings", "truncate", "text: str, limit: int) -> str",
     "Cut text to at most limit characters, ending with '...' when it was cut.",
     ("if len(text) <= limit:\n"
      "        return text\n"
      "    return text[:max(limit - 3, 0)] + \"...\""),
     ["assert truncate('hello world', 8) == 'hello...'", "assert truncate('hi', 5) == 'hi'"]),
    ("strings", "count_words", "text: str) -> int",
     "Count the words in text.",
     "return len(text.split())",
     ["assert count_words('one two  three') == 3", "assert count_words('') == 0"]),
    ("strings", "to_snake_case", "name: str) -> str",
     "Convert a camelCase name to snake_case.",
     ("result = \"\"\n"
      "    for ch in name:\n"
      "        result += \"_\" + ch.lower() if ch.isupper() else ch\n"
      "    return result.lstrip(\"_\")"),
     ["assert to_snake_case('camelCaseName') == 'camel_case_name'", "assert to_snake_case('name') == 'name'"]),
    ("strings", "first_repeated_char", "text: str) -> str",
     "Return the first character that occurs twice in text, or an empty string.",
     ("seen = set()\n"
      "    for ch in text:\n"
      "        if ch in seen:\n"
      "            return ch\n"
      "        seen.add(ch)\n"
      "    return \"\""),
     ["assert first_repeated_char('abcba') == 'b'", "assert first_repeated_char('abc') == ''"]),
    ("lists", "flatten", "nested: list[list[int]]) -> list[int]",
     "Flatten a list of lists into one list.",
     "return [item for inner in nested for item in inner]",
     ["assert flatten([[1, 2], [3], []]) == [1, 2, 3]"]),
    ("lists", "unique", "items: list[int]) -> list[int]",
     "Remove duplicates from items, keeping the first occurrence of each.",
     ("seen = set()\n"
      "    result = []\n"
      "    for item in items:\n"
      "        if item not in seen:\n"
      "            seen.add(item)\n"
      "            result.append(item)\n"
      "    return result"),
     ["assert unique([3, 1, 3, 2, 1]) == [3, 1, 2]"]),
    ("lists", "chunk", "items: list[int], size: int) -> list[list[int]]",
     "Split items into consecutive chunks of the given size.",
     "return [items[i:i + size] for i in range(0, len(items), size)]",
     ["assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]"]),
    ("lists", "second_largest", "numbers: list[int]) -> int",
     "Return the second largest distinct number in numbers.",
     "return sorted(set(numbers))[-2]",
     ["assert second_largest([4, 1, 4, 3]) == 3"]),
    ("lists", "rotate", "items: list[int], steps: int) -> list[int]",
     "Rotate items to the right by the given number of steps.",
     ("if not items:\n"
      "        return []\n"
      "    steps %= len(items)\n"
      "    return items[-steps:] + items[:-steps]"),
     ["assert rotate([1, 2, 3, 4], 1) == [4, 1, 2, 3]", "assert rotate([], 3) == []"]),
    ("lists", "running_sum", "numbers: list[int]) -> list[int]",
     "Return the running totals of numbers.",
     ("totals = []\n"
      "    total = 0\n"
      "    for number in numbers:\n"
      "        total += number\n"
      "        totals.append(total)\n"
      "    return totals"),
     ["assert running_sum([1, 2, 3]) == [1, 3, 6]"]),
    ("lists", "pairwise_max", "first: list[int], second: list[int]) -> list[int]",
     "Return the larger of each pair of elements at the same position.",
     "return [max(a, b) for a, b in zip(first, second)]",
     ["assert pairwise_max([1, 5, 3], [4, 2, 6]) == [4, 5, 6]"]),
    ("lists", "count_even", "numbers: list[int]) -> int",
     "Count the even numbers in numbers.",
     "return sum(1 for number in numbers if number % 2 == 0)",
     ["assert count_even([1, 2, 4, 7]) == 2"]),
    ("lists", "interleave", "first: list[int], second: list[int]) -> list[int]",
     "Interleave two lists of equal length.",
     "return [item for pair in zip(first, second) for item in pair]",
     ["assert interleave([1, 3], [2, 4]) == [1, 2, 3, 4]"]),
    ("lists", "find_index", "items: list[int], target: int) -> int",
     "Return the index of target in items, or -1 if it is absent.",
     ("for index, item in enumerate(items):\n"
      "        if item == target:\n"
      "            return index\n"
      "    return -1"),
     ["assert find_index([5, 6, 7], 6) == 1", "assert find_index([], 1) == -1"]),
    ("lists", "merge_sorted", "first: list[int], second: list[int]) -> list[int]",
     "Merge two sorted lists into one sorted list.",
     "return sorted(first + second)",
     ["assert merge_sorted([1, 4], [2, 3]) == [1, 2, 3, 4]"]),
    ("lists", "split_even_odd", "numbers: list[int]) -> tuple[list[int], list[int]]",
     "Split numbers into the even ones and the odd ones.",
     "return [n for n in numbers if n % 2 == 0], [n for n in numbers if n % 2]",
     ["assert split_even_odd([1, 2, 3, 4]) == ([2, 4], [1, 3])"]),
    ("numbers", "factorial", "n: int) -> int",
     "Return n factorial.",
     ("result = 1\n"
      "    for value in range(2, n + 1):\n"
      "        result *= value\n"
      "    return result"),
     ["assert factorial(5) == 120", "assert factorial(0) == 1"]),
    ("numbers", "is_prime", "n: int) -> bool",
     "Whether n is a prime number.",
     ("if n < 2:\n"
      "        return False\n"
      "    return all(n % d for d in range(2, int(n ** 0.5) + 1))"),
     ["assert is_prime(13)", "assert not is_prime(15)", "assert not is_prime(1)"]),
    ("numbers", "gcd", "a: int, b: int) -> int",
     "Return the greatest common divisor of a and b.",
     ("while b:\n"
      "        a, b = b, a % b\n"
      "    return a"),
     ["assert gcd(12, 18) == 6", "assert gcd(7, 5) == 1"]),
    ("numbers", "digit_sum", "n: int) -> int",
     "Return the sum of the decimal digits of n.",
     "return sum(int(digit) for digit in str(abs(n)))",
     ["assert digit_sum(1234) == 10", "assert digit_sum(-56) == 11"]),
    ("numbers", "fibonacci", "n: int) -> int",
     "Return the n-th Fibonacci number, with fibonacci(0) == 0.",
     ("a, b = 0, 1\n"
      "    for _ in range(n):\n"
      "        a, b = b, a + b\n"
      "    return a"),
     ["assert fibonacci(10) == 55", "assert fibonacci(0) == 0"]),
    ("numbers", "celsius_to_fahrenheit", "celsius: float) -> float",
     "Convert a temperature from Celsius to Fahrenheit.",
     "return celsius * 9 / 5 + 32",
     ["assert celsius_to_fahrenheit(100) == 212", "assert celsius_to_fahrenheit(0) == 32"]),
    ("numbers", "is_perfect_square", "n: int) -> bool",
     "Whether n is a perfect square.",
     ("if n < 0:\n"
      "        return False\n"
      "    root = int(n ** 0.5)\n"
      "    return root * root == n"),
     ["assert is_perfect_square(49)", "assert not is_perfect_square(50)"]),
    ("numbers", "clamp", "value: float, low: float, high: float) -> float",
     "Limit value to the range from low to high.",
     "return max(low, min(value, high))",
     ["assert clamp(5, 0, 3) == 3", "assert clamp(-1, 0, 3) == 0", "assert clamp(2, 0, 3) == 2"]),
    ("numbers", "mean", "numbers: list[float]) -> float",
     "Return the arithmetic mean of numbers.",
     "return sum(numbers) / len(numbers)",
     ["assert mean([1, 2, 3, 4]) == 2.5"]),
    ("numbers", "reverse_number", "n: int) -> int",
     "Reverse the decimal digits of a non-negative integer.",
     "return int(str(n)[::-1])",
     ["assert reverse_number(1230) == 321", "assert reverse_number(7) == 7"]),
    ("numbers", "count_divisors", "n: int) -> int",
     "Count the positive divisors of n.",
     "return sum(1 for d in range(1, n + 1) if n % d == 0)",
     ["assert count_divisors(12) == 6", "assert count_divisors(1) == 1"]),
    ("numbers", "is_leap_year", "year: int) -> bool",
     "Whether year is a leap year in the Gregorian calendar.",
     "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
     ["assert is_leap_year(2000)", "assert not is_leap_year(1900)", "assert is_leap_year(2024)"]),
    ("dicts", "invert_dict", "mapping: dict[str, int]) -> dict[int, str]",
     "Swap the keys and values of mapping.",
     "return {value: key for key, value in mapping.items()}",
     ["assert invert_dict({'a': 1, 'b': 2}) == {1: 'a', 2: 'b'}"]),
    ("dicts", "merge_counts", "first: dict[str, int], second: dict[str, int]) -> dict[str, int]",
     "Add up the counts of two dictionaries.",
     ("merged = dict(first)\n"
      "    for key, count in second.items():\n"
      "        merged[key] = merged.get(key, 0) + count\n"
      "    return merged"),
     ["assert merge_counts({'a': 1}, {'a': 2, 'b': 1}) == {'a': 3, 'b': 1}"]),
    ("dicts", "key_of_max", "scores: dict[str, int]) -> str",
     "Return the key with the largest value.",
     "return max(scores, key=scores.get)",
     ["assert key_of_max({'a': 3, 'b': 7, 'c': 5}) == 'b'"]),
    ("dicts", "group_by_length", "words: list[str]) -> dict[int, list[str]]",
     "Group words by their length.",
     ("groups = {}\n"
      "    for word in words:\n"
      "        groups.setdefault(len(word), []).append(word)\n"
      "    return groups"),
     ["assert group_by_length(['a', 'bb', 'c']) == {1: ['a', 'c'], 2: ['bb']}"]),
    ("dicts", "filter_by_value", "mapping: dict[str, int], minimum: int) -> dict[str, int]",
     "Keep the entries whose value is at least minimum.",
     "return {key: value for key, value in mapping.items() if value >= minimum}",
     ["assert filter_by_value({'a': 1, 'b': 5}, 3) == {'b': 5}"]),
    ("dicts", "word_index", "words: list[str]) -> dict[str, int]",
     "Map each word to the position of its first occurrence.",
     ("index = {}\n"
      "    for position, word in enumerate(words):\n"
      "        index.setdefault(word, position)\n"
      "    return index"),
     ["assert word_index(['x', 'y', 'x']) == {'x': 0, 'y': 1}"]),
    ("dicts", "sum_values", "mapping: dict[str, int]) -> int",
     "Return the sum of all values in mapping.",
     "return sum(mapping.values())",
     ["assert sum_values({'a': 2, 'b': 3}) == 5", "assert sum_values({}) == 0"]),
    ("dicts", "sort_by_value", "mapping: dict[str, int]) -> list[str]",
     "Return the keys sorted by their values, smallest first.",
     "return sorted(mapping, key=mapping.get)",
     ["assert sort_by_value({'a': 3, 'b': 1, 'c': 2}) == ['b', 'c', 'a']"]),
    ("dicts", "count_by_first_letter", "words: list[str]) -> dict[str, int]",
     "Count the words that start with each letter.",
     ("counts = {}\n"
      "    for word in words:\n"
      "        counts[word[0]] = counts.get(word[0], 0) + 1\n"
      "    return counts"),
     ["assert count_by_first_letter(['apple', 'avocado', 'banana']) == {'a': 2, 'b': 1}"]),
    ("dicts", "nested_get", "data: dict, keys: list[str], default=None)",
     "Follow keys into nested dictionaries, returning default when one is missing.",
     ("for key in keys:\n"
      "        if not isinstance(data, dict) or key not in data:\n"
      "            return default\n"
      "        data = data[key]\n"
      "    return data"),
     ["assert nested_get({'a': {'b': 2}}, ['a', 'b']) == 2", "assert nested_get({'a': {}}, ['a', 'b'], 0) == 0"]),
    ("dicts", "common_keys", "first: dict, second: dict) -> list",
     "Return the keys present in both dictionaries, sorted.",
     "return sorted(set(first) & set(second))",
     ["assert common_keys({'a': 1, 'b': 2}, {'b': 3, 'c': 4}) == ['b']"]),
    ("dicts", "default_counts", "keys: list[str]) -> dict[str, int]",
     "Map every key to zero.",
     "return {key: 0 for key in keys}",
     ["assert default_counts(['x', 'y']) == {'x': 0, 'y': 0}"]),
]
HELD_OUT_PER_CONCEPT = 3


def example(concept: str, name: str, signature: str, doc: str, body: str, tests: list[str]) -> dict:
    code = f"def {name}({signature}:\n    \"\"\"{doc}\"\"\"\n    {body}\n"
    namespace = {}
    exec(code + "\n".join(tests), namespace)  # the reference solution passes its own tests
    instruction = f"Write a Python function `{name}`: {doc[0].lower() + doc[1:]}"
    response = f"```python\n{code}```\n\nExample: `{tests[0].removeprefix('assert ')}`."
    return {"instruction": instruction, "response": response, "tests": tests, "concept": concept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", required=True, help="MLX model directory to train on")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out, seen = [], [], Counter()
    for problem in PROBLEMS:
        seen[problem[0]] += 1
        last = seen[problem[0]] > Counter(p[0] for p in PROBLEMS)[problem[0]] - HELD_OUT_PER_CONCEPT
        (held_out if last else train).append(example(*problem))
    for name, rows in (("code_train.jsonl", train), ("code_heldout.jsonl", held_out)):
        (args.out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "description": "Surgical LoRA on small Python problems in one house style; held out: three per concept.",
        "model": {"path": str(Path(args.model).resolve()), "dtype": "float32"},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]},
        "data": {"train": "code_train.jsonl", "valid": "code_heldout.jsonl"},
        "training": {"epochs": 5, "learning_rate": 5e-4, "warmup_steps": 5, "batch_size": 1,
                     "grad_accumulation_steps": 4, "max_seq_length": 512, "save_every": 100, "eval_every": 15},
        "eval": {"enabled": True, "max_tokens": 160, "generations": 3},
        "output": {"dir": str(args.out_dir / "adapters"), "name": "surgical"},
    }
    (args.out_dir / "surgical.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(train)} training and {len(held_out)} held-out problems and surgical.json to {args.out_dir}")


if __name__ == "__main__":
    main()
