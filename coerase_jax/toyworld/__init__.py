"""The small world: coloured shapes, captions with paraphrases, and a trained mini SD stack on it."""
