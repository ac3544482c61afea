"""Generate tf_byte_classifier.onnx: a byte-level prose/code classifier trained in TensorFlow
and exported by tf2onnx. Committed, because CI has no TensorFlow to rebuild it.

Run from the repository root in a venv with TensorFlow and tf2onnx (not the project venv):

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfvenv/bin/python benchmarks/corpus_fixtures/make_tf_byte_model.py OUT_DIR

Made with tensorflow-cpu 2.21.0, tf2onnx 1.17.0, onnx 1.23.2 (opset 17), CPython 3.11.7.
The forward pass is written with raw tf ops, not Keras, so the exported dense layers keep
the bias shapes real exporters emit on rank-3 activations ([batch, bytes, features]):
  dense1: MatMul + Add with a [1, 1, 64] bias, as jax2tf writes `x @ w + b[None, None, :]`;
  dense2: MatMul + Add with a [64] bias, as Keras' Dense does;
  head:   MatMul + Add on the mean-pooled [batch, 64] features.
Writes OUT_DIR/tf_byte_classifier.onnx, calib.npz (input_ids) and test.npz (input_ids, labels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.corpus_text import byte_snippets  # noqa: E402

SEQ = 64
EMBED = 32
HIDDEN = 64
CLASSES = 2
STEPS = 300
SEED = 0
FIXTURE = "tf_byte_classifier"  # the committed copy: benchmarks/corpus_fixtures/FIXTURE/


class ByteClassifier(tf.Module):
    def __init__(self) -> None:
        init = tf.keras.initializers.GlorotUniform(seed=SEED)
        self.embed = tf.Variable(init([256, EMBED]), name="embed")
        self.w1 = tf.Variable(init([EMBED, HIDDEN]), name="w1")
        self.b1 = tf.Variable(tf.zeros([HIDDEN]), name="b1")
        self.w2 = tf.Variable(init([HIDDEN, HIDDEN]), name="w2")
        self.b2 = tf.Variable(tf.zeros([HIDDEN]), name="b2")
        self.w3 = tf.Variable(init([HIDDEN, CLASSES]), name="w3")
        self.b3 = tf.Variable(tf.zeros([CLASSES]), name="b3")

    @tf.function(input_signature=[tf.TensorSpec([None, SEQ], tf.int64, name="input_ids")])
    def __call__(self, input_ids):
        x = tf.gather(self.embed, input_ids)
        h = tf.nn.relu(tf.matmul(x, self.w1) + tf.reshape(self.b1, [1, 1, HIDDEN]))
        h = tf.nn.relu(tf.matmul(h, self.w2) + self.b2)
        pooled = tf.reduce_mean(h, axis=1)
        return tf.identity(tf.matmul(pooled, self.w3) + self.b3, name="logits")


def train(model: ByteClassifier) -> None:
    x, y = byte_snippets(4096, SEQ, seed=SEED, part="train")
    optimizer = tf.keras.optimizers.Adam(3e-3)
    rng = np.random.default_rng(SEED)
    for step in range(STEPS):
        batch = rng.integers(0, len(x), 64)
        with tf.GradientTape() as tape:
            logits = model(tf.constant(x[batch]))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y[batch], logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if step % 100 == 0:
            print(f"step {step} loss {float(loss):.3f}")


def main(out: Path) -> None:
    tf.random.set_seed(SEED)
    out.mkdir(parents=True, exist_ok=True)
    model = ByteClassifier()
    train(model)
    calib_x, _ = byte_snippets(256, SEQ, seed=SEED + 10, part="train")
    test_x, test_y = byte_snippets(256, SEQ, seed=SEED + 20, part="test")
    accuracy = float(np.mean(np.argmax(model(tf.constant(test_x)).numpy(), 1) == test_y))
    print(f"held-out accuracy {accuracy:.3f}")
    # A plain tf.function around the module: given the module's own bound method, tf2onnx
    # 1.17 made every intermediate tensor (and the variables) a graph output.
    forward = tf.function(lambda input_ids: {"logits": model(input_ids)})
    tf2onnx.convert.from_function(
        forward,
        input_signature=[tf.TensorSpec([None, SEQ], tf.int64, name="input_ids")],
        opset=17,
        output_path=str(out / "tf_byte_classifier.onnx"),
    )
    np.savez_compressed(out / "calib.npz", input_ids=calib_x)
    np.savez_compressed(out / "test.npz", input_ids=test_x, labels=test_y)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / FIXTURE)
