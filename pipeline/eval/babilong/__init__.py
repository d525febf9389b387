"""BABILong (Kuratov et al., 2024; booydar/babilong): bAbI facts hidden in book text, a question at the end.

`babi.py` reads bAbI task files into samples, `samples.py` builds the haystacks and prompts, `answers.py` scores an
answer as the benchmark does, `evaluate.py` runs a model over tasks and lengths, `report.py` writes the results.
`babi/` holds lm2's held-out stories, the default task data.
"""
