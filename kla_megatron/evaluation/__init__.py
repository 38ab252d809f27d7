"""Zero-shot scores of a checkpoint on lm-evaluation-harness tasks (``kla-eval``, ``cli.py``):
``loading.py`` reads any checkpoint kind as the Hugging Face model, ``lm.py`` is lm-eval's model
interface over it, ``report.py`` writes the JSON and Markdown results. Nothing imports this
package; it imports ``checkpoint``, ``models``, ``hf`` and the trainer's tokenizer."""
