"""Structured outputs: a request's tokens held to a grammar (a JSON schema, a regex, choices, an
EBNF grammar) by masking, before sampling, every token the grammar does not allow next.
`grammar.py` speaks to the grammar library (xgrammar), `manager.py` keeps the engine core's
compiled grammars and each request's matcher, `bitmask.py` carries the masks to the model runner
and applies them. docs/structured_outputs.md says why xgrammar and how it fits the engine."""
