"""User errors at the command line: one message, exit code 2, no traceback (``LIT_DISTILL_DEBUG=1`` shows it).

What counts as the user's: a ``ValueError`` (the package's checks, ``DataFileError``, the config parser's type
errors), a missing, existing or forbidden file, or a teacher that cannot answer, found at the root of the
exception's cause chain. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

from lit_distill.teachers.base import TeacherError

DEBUG_ENV = "LIT_DISTILL_DEBUG"
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
# TeacherError: a teacher that refuses requests or leaves too many questions unanswered; its message says what
# to do, and a traceback would add nothing.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, TeacherError)
# Lines of jsonargparse's union report that say nothing about the mistake: the alternatives that were not meant
# (``Expected a <class 'NoneType'>``), the list of subtypes, and a dump of the whole value.
_NOISE = re.compile(r"^\s*(- Expected a <class 'NoneType'>|Does not validate against any of the Union subtypes"
                    r"|Subtypes: |Errors:$|Given value type: |Given value: )")


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def concise(message: str) -> str:
    """``message`` on one line, without the config parser's union noise (the one alternative that failed is kept):
    ``Parser key "model": Problem with given class_path '...GRPOModule': Option 'betaa' is not accepted``."""
    kept = [line.strip().removeprefix("- ") for line in message.splitlines() if not _NOISE.match(line)]
    return " ".join(line for line in kept if line)


def user_error_message(error: BaseException) -> Optional[str]:
    """The one message to show for ``error`` if it is the user's (see the module docstring), else None."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    if not isinstance(root, USER_ERRORS):
        return None
    keys = [match.group(1) for link in chain if (match := re.search(r'Parser key "([^"]+)"', str(link)))]
    message = str(root)
    return f"{keys[0]}: {message}" if keys and not message.startswith(keys[0]) else message


def exit_with(message: str) -> None:
    sys.stderr.write(f"error: {message}\n(set {DEBUG_ENV}=1 for the traceback)\n")
    sys.exit(2)
