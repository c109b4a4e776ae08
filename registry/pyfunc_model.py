"""A registered checkpoint as an `mlflow.pyfunc` model: the project's generation pipeline over its weights.

Logged as a model from code (`mlflow.pyfunc.log_model(python_model=<this file>, ...)`): MLflow stores this file
as the model's code and runs it at load time; `set_model` below names the model. Nothing is pickled: the weights
are the checkpoint's release directory (configs, safetensors, tokenizer) logged as the `checkpoint` artifact, the
sampling and pipeline settings are the model_config, and the classes come from the installed `scone-ops` package.

    model = mlflow.pyfunc.load_model("models:/scone-tiny@champion")
    model.predict(pd.DataFrame({"instruction": ["..."], "reference_images": [[b64_png, ...]]}))  # -> `image`
"""
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from registry.pyfunc_io import (
    CHECKPOINT_ARTIFACT, IMAGE, INSTRUCTION, PIPELINE_KEY, REFERENCE_IMAGES, decode_png, encode_png, reference_list,
    sampling_settings,
)


class SconePipeline(PythonModel):
    """Loads the checkpoint with `model.pipeline.load_pipeline` (its settings from the model_config) and
    generates with it."""

    def load_context(self, context):
        from model.pipeline import load_pipeline

        self.sampling = sampling_settings(context.model_config)
        self.pipe = load_pipeline(context.artifacts[CHECKPOINT_ARTIFACT],
                                  (context.model_config or {}).get(PIPELINE_KEY))

    # pd.DataFrame: MLflow validates the input against the logged signature, not a type hint
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from model.batching import Example

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        if INSTRUCTION not in model_input.columns:
            raise ValueError(f"input needs an `{INSTRUCTION}` column (and optionally `{REFERENCE_IMAGES}`: "
                             f"base64 PNGs); got columns {list(model_input.columns)}")
        refs = model_input[REFERENCE_IMAGES] if REFERENCE_IMAGES in model_input.columns else [None] * len(model_input)
        limit = self.pipe.max_references
        examples = []
        for i, (text, cell) in enumerate(zip(model_input[INSTRUCTION], refs)):
            images = [decode_png(r) for r in reference_list(cell)]
            if len(images) > limit:
                raise ValueError(f"row {i}: {len(images)} reference images, this model takes at most {limit}")
            examples.append(Example(refs=images, instruction=str(text)))
        s = sampling_settings(self.sampling, params)
        with torch.no_grad():
            out = self.pipe.generate(examples, steps=s["steps"], cfg_text=s["cfg_text"], cfg_image=s["cfg_image"],
                                     seed=s["seed"], bridge=s["bridge"])
        return pd.DataFrame({IMAGE: [encode_png(img) for img in out]})


mlflow.models.set_model(SconePipeline())
