"""The compiled training step and loop, and the progress window over their results.

One step: forward in training mode, softmax cross-entropy (optionally label-smoothed)
averaged over the global batch, plus L2 over all trainable weights, backward, gradients
averaged over the devices, SGD with Nesterov momentum (the optimizer the run built).
"""
import time

from hrnet.train.config import TrainConfig


def loop_steps(step: int, cfg: TrainConfig, val_steps) -> int:
    """Steps for the next call of the training loop: steps_per_loop, cut short where the
    host has work (a log line, a checkpoint, a validation, the end)."""
    due = [cfg.train_steps, (step // cfg.log_every + 1) * cfg.log_every,
           (step // cfg.checkpoint_every + 1) * cfg.checkpoint_every]
    due += [s for s in val_steps if s > step]
    return max(1, min(cfg.steps_per_loop, min(due) - step))


def make_train_loop(cfg: TrainConfig, backend, model, optimizer, step_var):
    """The compiled loop: ``n`` steps in one call (a while loop in the graph; on the npu, the
    adapter's sunk loop). One step: a batch per replica, the gradients all-reduced, the step
    counted. Returns the data loss and correct predictions summed over the steps run, a
    non-finite flag and the steps run: a non-finite step ends the loop early (except on the
    npu, whose sunk loop runs its whole length), so it is caught at the step it happened."""
    import tensorflow as tf

    from hrnet import compat

    strategy = backend.strategy
    loss_batch = cfg.batch_size * strategy.num_replicas_in_sync
    trainable = model.trainable_variables
    num_classes = cfg.num_classes
    smoothing = cfg.label_smoothing

    def step_fn(images, labels):
        labels = tf.cast(labels, tf.int32)
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            targets = tf.one_hot(labels, num_classes)
            if smoothing:
                targets = targets * (1.0 - smoothing) + smoothing / num_classes
            per_example = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            data_loss = tf.reduce_sum(per_example) / loss_batch
            l2 = tf.add_n([tf.nn.l2_loss(tf.cast(compat.tf_variable(v), tf.float32)) for v in trainable])
            loss = data_loss + cfg.weight_decay * l2 / strategy.num_replicas_in_sync
            scaled = compat.scale_loss(optimizer, loss) if backend.loss_scaling else loss
        grads = tape.gradient(scaled, trainable)
        if backend.loss_scaling:
            grads = compat.unscale_gradients(optimizer, grads)
        grads = backend.all_reduce_gradients(grads)
        if backend.loss_scaling:
            bad = tf.constant(0.0)  # the loss-scale optimizer skips steps with non-finite gradients
        else:
            bad = 1.0 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]), tf.float32)
        optimizer.apply_gradients(zip(grads, trainable))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels),
                                        tf.float32))
        # Non-finite total loss (data + L2) or gradients: BatchNorm keeps the data loss finite
        # while exploding weights overflow the L2 term and the momentum.
        bad = tf.maximum(bad, 1.0 - tf.cast(tf.math.is_finite(loss), tf.float32))
        return data_loss, correct, bad

    def one_step(it):
        images, labels = next(it)
        results = strategy.run(step_fn, args=(images, labels))
        step_var.assign_add(1)
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

    @tf.function
    def train_loop(it, n):
        def more(done, loss, correct, bad):
            return done < n if backend.sinks_loops else tf.logical_and(done < n, bad == 0.0)

        def body(done, loss, correct, bad):
            step_loss, step_correct, step_bad = one_step(it)
            return done + 1, loss + step_loss, correct + step_correct, tf.maximum(bad, step_bad)

        zero = tf.constant(0.0)
        done, loss, correct, bad = tf.while_loop(more, body, (tf.constant(0), zero, zero, zero))
        return loss, correct, bad, done

    return train_loop


class Window:
    """Loss, top-1 and speed over the steps since the last progress line."""

    def __init__(self):
        self._begin()

    def _begin(self) -> None:
        self.loss = self.correct = self.timed_seconds = 0.0
        self.steps = self.timed_steps = 0
        self.start = time.time()

    def add(self, loss: float, correct: float, seconds: float, steps: int, timed: bool) -> None:
        """Sums over ``steps`` steps that took ``seconds``."""
        self.loss += loss
        self.correct += correct
        self.steps += steps
        if timed:
            self.timed_steps += steps
            self.timed_seconds += seconds

    def close(self, step: int, cfg: TrainConfig, lr: float):
        """This window's history line and seconds per step; then a new window begins."""
        elapsed = time.time() - self.start
        per_step = self.timed_seconds / self.timed_steps if self.timed_steps else elapsed / max(1, self.steps)
        line = {
            "step": step,
            "epoch": round(step / cfg.steps_per_epoch, 4),
            "loss": self.loss / self.steps,
            "top1": self.correct / (self.steps * cfg.global_batch_size),
            "lr": lr,
            "images_per_sec": cfg.global_batch_size / per_step if per_step > 0 else 0.0,
        }
        self._begin()
        return line, per_step


def barrier(strategy) -> None:
    """Wait for every worker (a one-number all-reduce); a no-op with one replica."""
    if strategy.num_replicas_in_sync > 1:
        import tensorflow as tf

        @tf.function  # collectives run eagerly are slow, and TF says so
        def all_reduce_one():
            return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.ones([])), axis=None)

        all_reduce_one().numpy()
