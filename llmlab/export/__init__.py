"""`llmlab export RUN_DIR --out DIR`: a finished run as a folder to share on the Hugging Face Hub.

What goes in the folder depends on whether the run's model has a Hugging Face twin (`exporter_for` in
core.py picks the writer by the run's recipe):

- BERT (agnews-bert): the run's HF model directory as it is (config with the class names, safetensors
  weights, tokenizer files), loadable with `AutoModelForSequenceClassification` / `pipeline` (bert.py);
- GPT-2 and LLaMA language models (shakespeare-gpt, gpt-pretrain, gpt-finetune, gpt-tp, llama-pretrain,
  llama-lora with full fine-tuning): HF `GPT2LMHeadModel` / `LlamaForCausalLM` directories written by the
  models' own converters, and the run's tokenizer as HF tokenizer files (causal_lm.py, tokenizer.py);
- LoRA / QLoRA adapters (llama-lora): PEFT's `adapter_config.json` + `adapter_model.safetensors`, and the
  merged model on request (adapter.py);
- everything else (mnist-mlp, cifar10-resnet*, imdb-lstm/gru, the translation Transformers):
  model.safetensors + the llmlab config.json + the run's tokenizer or vocabulary, loaded with llmlab
  (plain.py).

Every folder also gets the model card README.md (card.py: Hub metadata, task, data, metrics with the command
that produced them, training setup, limitations, how to load), the run record under llmlab_run/ and a
manifest, llmlab_export.json (what was exported from where, with checksums). `--push-to-hub REPO_ID` uploads
the folder with huggingface_hub (hub.py).

References: Hugging Face Hub, "Model Cards" (https://huggingface.co/docs/hub/model-cards) and the model-index
metadata of hub-docs' modelcard.md; PEFT, "Checkpoint format"
(https://huggingface.co/docs/peft/developer_guides/checkpoint).
"""

from llmlab.export.core import export_run
from llmlab.export.hub import HubPushError, push_to_hub
from llmlab.export.run import EXPORT_MANIFEST, RunExport

__all__ = ["EXPORT_MANIFEST", "HubPushError", "RunExport", "export_run", "push_to_hub"]
