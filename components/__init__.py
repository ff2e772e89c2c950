"""KFP components: one thin ``@dsl.component`` per pipeline step.

Each body imports ``hrnet`` and calls one library function; the logic lives in the
library, which the step images install. Image names live in ``components.images``.
"""
