"""The LLM judge ("GPT-Eval"): grades story completions for grammar, creativity, consistency."""
