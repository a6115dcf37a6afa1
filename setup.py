"""The one compiled part: the request path's log line in C (serving/_lines.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C
compiler, no Python headers) the install goes on, and the model server makes the same line in
Python and says so when it starts (``serving.logger``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("serving._lines", ["serving/_lines.c"], optional=True)])
