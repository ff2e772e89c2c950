"""The model's BatchNormalization: TF's fused kernel under Keras 3 (as Keras 2 computes it),
on a channel-grouped view of its input where oneDNN's kernel for the channel count is slow.

Keras 2 (the Ascend image) uses its own layer, which is already fused.
"""
import math

import tensorflow as tf

from hrnet.compat import KERAS3, keras


def _channel_groups(shape) -> int:
    """k such that k * channels is a multiple of 16 and k divides the width: the batch
    norm of NHWC x then runs on the [N, H, W/k, k*C] view of x (1 where none exists)."""
    k = 16 // math.gcd(int(shape[-1]), 16)
    return k if shape[2] is not None and shape[2] % k == 0 else 1


def _tile(v, k):
    return tf.tile(v, [k])


def _batch_norm_on_view(x, gamma, beta, mean, variance, epsilon, training, k):
    """Batch norm of NHWC x on its [N, H, W/k, k*C] view, where channel j is channel
    j % C of x: oneDNN's fast kernels need channels in multiples of 16 (HRNet-W18's
    18-channel BN runs 3.5x faster in float32 this way, 5.6x in bfloat16 with no casts).
    The same function of x as one fused batch norm over C channels: the k per-view-channel
    statistics of each channel combine into its own (equal counts: the law of total
    variance), and a second pass normalizes with them. Returns the output, and in training
    the batch's mean and biased variance."""
    _, h, w, c = x.shape
    shape = [-1, h, w // k, k * c]
    if not training:
        y = tf.raw_ops.FusedBatchNormV3(
            x=tf.reshape(x, shape), scale=_tile(gamma, k), offset=_tile(beta, k), mean=_tile(mean, k),
            variance=_tile(variance, k), epsilon=epsilon, is_training=False)[0]
        return tf.reshape(y, tf.shape(x)), None, None

    @tf.custom_gradient
    def train(x, gamma, beta):
        view = tf.reshape(x, shape)
        count = tf.cast(tf.size(x) // c, tf.float32)  # elements per channel of x
        # Per view channel: mean and (the kernel's Bessel-corrected) variance of count/k values.
        _, means, variances = tf.raw_ops.FusedBatchNormV3(
            x=view, scale=tf.ones([k * c]), offset=tf.zeros([k * c]), mean=tf.zeros([0]),
            variance=tf.zeros([0]), epsilon=epsilon, is_training=True)[:3]
        part = count / k
        means, variances = tf.reshape(means, [k, c]), tf.reshape(variances, [k, c]) * (tf.maximum(part - 1, 1) / part)
        batch_mean = tf.reduce_mean(means, 0)
        batch_var = tf.reduce_mean(variances, 0) + tf.reduce_mean(tf.square(means - batch_mean), 0)
        stats = dict(epsilon=epsilon, is_training=False)
        y = tf.raw_ops.FusedBatchNormV3(x=view, scale=_tile(gamma, k), offset=_tile(beta, k),
                                        mean=_tile(batch_mean, k), variance=_tile(batch_var, k), **stats)[0]

        def grad(dy, *_):
            # The kernel's inference-mode gradient treats the statistics as constants: it
            # gives dy * gamma * rstd, and sum(dy * x_hat), sum(dy) per view channel.
            # What the statistics' own dependence on x adds to dx is affine in x per
            # channel, -(gamma * rstd / count) * (dbeta + x_hat * dgamma): one more pass of
            # the kernel computes it.
            dx, dgamma, dbeta = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=tf.reshape(dy, shape), x=view, scale=_tile(gamma, k),
                reserve_space_1=_tile(batch_mean, k), reserve_space_2=_tile(batch_var, k),
                reserve_space_3=tf.zeros([0]), **stats)[:3]
            dgamma = tf.reduce_sum(tf.reshape(dgamma, [k, c]), 0)
            dbeta = tf.reduce_sum(tf.reshape(dbeta, [k, c]), 0)
            rstd = tf.math.rsqrt(batch_var + epsilon)
            through_stats = tf.raw_ops.FusedBatchNormV3(
                x=view, scale=_tile(-gamma * rstd * dgamma / count, k),
                offset=_tile(-gamma * rstd * dbeta / count, k), mean=_tile(batch_mean, k),
                variance=_tile(batch_var, k), **stats)[0]
            return tf.reshape(dx + through_stats, tf.shape(x)), dgamma, dbeta

        return (tf.reshape(y, tf.shape(x)), batch_mean, batch_var), grad

    return train(x, gamma, beta)


class _FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras 3's BatchNormalization on TF's fused kernel, as Keras 2 computes it.

    Keras 3 composes batch norm of about ten elementwise ops (upcast to float32 and cast
    back under a mixed policy) and differentiates each of them. FusedBatchNormV3 is one op,
    and one gradient op; oneDNN folds it into the preceding float32 convolution for
    inference. Measured on AMX (HRNet-W18, batch 16): inference 15.5 -> 22.9 img/s under
    mixed_bfloat16, 19.7 -> 22.8 in float32.

    oneDNN's batch norm has fast kernels only for channel counts that are multiples of 16
    in bfloat16 (of 4 in float32) and a slow generic one otherwise (ONEDNN_VERBOSE:
    ``nspc_bnorm:any``): HRNet-W18's 18 branch channels, in bfloat16 its 36 and 72 too. There
    the layer normalizes the channel-grouped view of its input (``_batch_norm_on_view``); where the
    width does not divide into groups, a 16-bit input goes to the kernel in float32 between
    two casts, which beats the generic kernel. Measured on AMD Zen 4 (AVX-512 with bf16, no
    AMX), W18, batch 16, against the casts: bf16 training 6.2 -> 7.4 img/s, unfolded bf16
    inference 21.5 -> 25.2, fp32 training 4.7 -> 5.0 (against the generic kernel).

    The statistics are float32 either way (the kernel accumulates in float32), as Keras 3
    computes them. The weights are the same four; the moving variance is updated with the
    batch's unbiased variance, as Keras 2 and PyTorch do (Keras 3's own layer uses the
    biased one).
    """

    def call(self, inputs, training=None, mask=None):
        if (mask is not None or self.renorm or len(inputs.shape) != 4 or self.axis % 4 != 3
                or not (self.center and self.scale)):
            return super().call(inputs, training=training, mask=mask)
        training = bool(training and self.trainable)
        if _on_view(inputs, training):
            return self._call_on_view(inputs, training)
        x = inputs if inputs.shape[-1] % 16 == 0 else tf.cast(inputs, tf.float32)
        if not training:
            outputs = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=False)[0]
        else:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=True, exponential_avg_factor=1.0 - self.momentum)
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
        return tf.cast(outputs, inputs.dtype)

    def _call_on_view(self, inputs, training):
        weights = [tf.convert_to_tensor(w) for w in (self.gamma, self.beta, self.moving_mean, self.moving_variance)]
        outputs, mean, variance = _batch_norm_on_view(
            inputs, *weights, epsilon=self.epsilon, training=training, k=_channel_groups(inputs.shape))
        if training:
            count = tf.cast(tf.size(inputs) // inputs.shape[-1], tf.float32)
            unbiased = variance * count / tf.maximum(count - 1, 1)
            self.moving_mean.assign(weights[2] * self.momentum + mean * (1 - self.momentum))
            self.moving_variance.assign(weights[3] * self.momentum + unbiased * (1 - self.momentum))
        return outputs


def _on_view(inputs, training: bool) -> bool:
    """Whether oneDNN's batch norm is faster on the channel-grouped view of inputs.

    Where its own kernel would be the generic one: a 16-bit input whose channels are not a
    multiple of 16 (otherwise cast to float32 and back), or, in training, a float32 one
    whose channels are not a multiple of 4 (HRNet-W18's 18 and W30's 30; 36 and 72 have
    SSE / AVX2 kernels, on par with the view's two passes). Not float32 inference, where
    grappler folds the batch norm into the convolution before it; not with a GPU, where
    cuDNN has no such gaps.
    """
    channels = inputs.shape[-1]
    if inputs.dtype == tf.float32:
        wanted = training and channels % 4 != 0
    else:
        wanted = channels % 16 != 0
    return wanted and _channel_groups(inputs.shape) > 1 and not tf.config.list_physical_devices("GPU")


# Keras 2's own layer is already fused (fused=None picks the kernel for 4-D NHWC inputs).
BatchNormalization = _FusedBatchNormalization if KERAS3 else keras.layers.BatchNormalization
