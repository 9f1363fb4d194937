import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from greeting import greeting  # noqa: E402


class GreetingTest(unittest.TestCase):
    def test_greeting_names_the_caller(self) -> None:
        self.assertEqual(greeting("ann"), "hello, ann")


if __name__ == "__main__":
    unittest.main()
