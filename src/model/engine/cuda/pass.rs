//! The sequence of one pass on the device: the forward of `BertForSequenceClassification`
//! (keeping what the backward needs in the workspace), the loss, and the backward into the flat
//! gradient buffer. Everything is queued on candle's stream; nothing here waits for the device.
//!
//! Dropout sites: engine/sites.rs's list, each keyed `site_key(step_key, site.index(L))`.

use crate::error::Result;
use crate::model::config::BertConfig;
use crate::model::engine::cuda::blas::{gemm, Mat};
use crate::model::engine::cuda::device::{
    elementwise, launch, per_row, site_key, zero_bytes, DropSite, LN_ROWS,
};
use crate::model::engine::cuda::{tensor_ptr, Buffers, DeviceBatch, State};
use crate::model::engine::launch as shape;
use crate::model::engine::sites::Site;
use crate::model::engine::Dims;
use crate::model::params::Classifier;

/// One pass over one batch: the state, the buffers, the sizes and the batch's addresses.
pub(crate) struct Run<'a> {
    st: &'a State,
    b: &'a Buffers,
    dm: Dims,
    eps: f32,
    vocab: i32,
    ntype: i32,
    pad: u32,
    ids: u64,
    types: u64,
    mask: u64,
    labels: u64,
    regression: bool,
    /// Dropout sites, all off in evaluation.
    drops: Vec<DropSite>,
}

impl<'a> Run<'a> {
    pub(crate) fn new(
        st: &'a State,
        b: &'a Buffers,
        dm: Dims,
        cfg: &BertConfig,
        batch: &DeviceBatch,
        step_key: Option<u64>,
    ) -> Result<Self> {
        let s = &st.stream;
        let drops = Site::all(dm.layers)
            .into_iter()
            .map(|site| match step_key {
                Some(k) => DropSite::new(site_key(k, site.index(dm.layers) as u64), site.p(cfg)),
                None => DropSite::OFF,
            })
            .collect();
        let labels = match &batch.labels {
            Some(l) => tensor_ptr(l, s, "the labels")?,
            None => 0,
        };
        zero_bytes(s, b.flag.ptr, 4)?;
        Ok(Run {
            st,
            b,
            dm,
            eps: cfg.layer_norm_eps as f32,
            vocab: cfg.vocab_size as i32,
            ntype: cfg.type_vocab_size as i32,
            pad: cfg.pad_token_id,
            ids: tensor_ptr(&batch.ids, s, "the token ids")?,
            types: tensor_ptr(&batch.types, s, "the token type ids")?,
            mask: tensor_ptr(&batch.mask, s, "the attention mask")?,
            labels,
            regression: batch.regression,
            drops,
        })
    }

    fn drop_at(&self, site: Site) -> DropSite {
        self.drops[site.index(self.dm.layers)]
    }
    fn emb_drop(&self) -> DropSite {
        self.drop_at(Site::Embeddings)
    }
    fn attn_drop(&self, l: usize) -> DropSite {
        self.drop_at(Site::AttentionProbs(l))
    }
    fn out1_drop(&self, l: usize) -> DropSite {
        self.drop_at(Site::AttentionOutput(l))
    }
    fn out2_drop(&self, l: usize) -> DropSite {
        self.drop_at(Site::Output(l))
    }
    fn head_drop(&self) -> DropSite {
        self.drop_at(Site::Classifier)
    }

    /// `C = op(A)·op(B) (+ C when acc)`.
    #[allow(clippy::too_many_arguments)]
    fn mm(&self, m: usize, n: usize, k: usize, a: Mat, b: Mat, c: Mat, acc: bool) -> Result<()> {
        gemm(
            &self.st.blas,
            m,
            n,
            k,
            a,
            b,
            c,
            1.0,
            if acc { 1.0 } else { 0.0 },
            1,
        )
    }

    /// A strided-batched product over the batch rows (one per example), for one head.
    #[allow(clippy::too_many_arguments)]
    fn mm_batched(&self, m: usize, n: usize, k: usize, a: Mat, b: Mat, c: Mat) -> Result<()> {
        gemm(&self.st.blas, m, n, k, a, b, c, 1.0, 0.0, self.dm.b)
    }

    /// The forward up to the logits without their bias (added by [`Self::loss`] or
    /// [`Self::logits_bias`]). `train` keeps the dropped probabilities for the backward.
    pub(crate) fn forward(&self, p: &Classifier<u64>, train: bool) -> Result<()> {
        let (st, b, dm) = (self.st, self.b, self.dm);
        let s = &st.stream;
        let k = &st.k;
        let (n, t, h, nh, d, inter) = (dm.n(), dm.t, dm.h, dm.nh, dm.d, dm.inter);
        let (bsz, tt) = (dm.b, t * t);
        let e = &p.bert.embeddings;
        launch!(s, &k.embed_ln_fwd, per_row(n), "embed_ln_fwd";
            self.ids, self.types, e.word_embeddings, e.position_embeddings,
            e.token_type_embeddings, e.layer_norm.weight, e.layer_norm.bias,
            b.x0.ptr, b.xhat0.ptr, b.inv0.ptr, n as i32, t as i32, h as i32, self.vocab,
            self.ntype, self.eps, self.emb_drop(), b.flag.ptr)?;
        let scale = (d as f64).powf(-0.5) as f32;
        let mut x = b.x0.ptr;
        for (l, (lw, lb)) in p.bert.layers.iter().zip(&b.layers).enumerate() {
            let a = &lw.attention;
            launch!(s, &k.qkv_stack, elementwise(3 * h * h + 3 * h), "qkv_stack";
                lb.w3.ptr, lb.b3.ptr, a.query.weight, a.key.weight, a.value.weight,
                a.query.bias, a.key.bias, a.value.bias, h as i32)?;
            // Q|K|V = x·W₃ᵀ + b₃
            self.mm(
                n,
                3 * h,
                h,
                Mat::n(x, h),
                Mat::t(lb.w3.ptr, h),
                Mat::n(lb.qkv.ptr, 3 * h),
                false,
            )?;
            launch!(s, &k.bias_add, elementwise(n * 3 * h), "bias_add";
                lb.qkv.ptr, lb.b3.ptr, n as i32, (3 * h) as i32)?;
            // Scores per head: S = Q·Kᵀ over head views of the Q|K|V rows.
            for hh in 0..nh {
                self.mm_batched(
                    t,
                    t,
                    d,
                    Mat::n(lb.qkv.at(hh * d), 3 * h).every(t * 3 * h),
                    Mat::t(lb.qkv.at(h + hh * d), 3 * h).every(t * 3 * h),
                    Mat::n(lb.probs.at(hh * tt), t).every(nh * tt),
                )?;
            }
            let drop = self.attn_drop(l);
            let dropping = train && drop.threshold != 0;
            let pd = if dropping { lb.pd.ptr } else { 0u64 };
            launch!(s, &k.softmax_fwd, per_row(bsz * nh * t), "softmax_fwd";
                lb.probs.ptr, pd, self.mask, (bsz * nh * t) as i32, t as i32, nh as i32,
                scale, drop)?;
            let pused = if dropping { lb.pd.ptr } else { lb.probs.ptr };
            // Context per head: C = P·V, written into the head's columns of ctx.
            for hh in 0..nh {
                self.mm_batched(
                    t,
                    d,
                    t,
                    Mat::n(pused + (hh * tt * 4) as u64, t).every(nh * tt),
                    Mat::n(lb.qkv.at(2 * h + hh * d), 3 * h).every(t * 3 * h),
                    Mat::n(lb.ctx.at(hh * d), h).every(t * h),
                )?;
            }
            let ao = &lw.attention_output;
            self.mm(
                n,
                h,
                h,
                Mat::n(lb.ctx.ptr, h),
                Mat::t(ao.dense.weight, h),
                Mat::n(b.lin.ptr, h),
                false,
            )?;
            launch!(s, &k.add_ln_fwd, per_row(n), "add_ln_fwd";
                b.lin.ptr, ao.dense.bias, self.out1_drop(l), x, ao.layer_norm.weight,
                ao.layer_norm.bias, lb.y1.ptr, lb.xhat1.ptr, lb.inv1.ptr, n as i32, h as i32,
                self.eps)?;
            let it = &lw.intermediate;
            self.mm(
                n,
                inter,
                h,
                Mat::n(lb.y1.ptr, h),
                Mat::t(it.weight, h),
                Mat::n(lb.f.ptr, inter),
                false,
            )?;
            launch!(s, &k.gelu_fwd, elementwise(n * inter), "gelu_fwd";
                lb.f.ptr, it.bias, lb.g.ptr, n as i32, inter as i32)?;
            let out = &lw.output;
            self.mm(
                n,
                h,
                inter,
                Mat::n(lb.g.ptr, inter),
                Mat::t(out.dense.weight, inter),
                Mat::n(b.lin.ptr, h),
                false,
            )?;
            launch!(s, &k.add_ln_fwd, per_row(n), "add_ln_fwd";
                b.lin.ptr, out.dense.bias, self.out2_drop(l), lb.y1.ptr, out.layer_norm.weight,
                out.layer_norm.bias, lb.y2.ptr, lb.xhat2.ptr, lb.inv2.ptr, n as i32, h as i32,
                self.eps)?;
            x = lb.y2.ptr;
        }
        // Pooler on the [CLS] rows (row stride T·H: no gather), tanh, dropout, head.
        let pool = &p.bert.pooler;
        self.mm(
            bsz,
            h,
            h,
            Mat::n(x, t * h),
            Mat::t(pool.weight, h),
            Mat::n(b.zpool.ptr, h),
            false,
        )?;
        launch!(s, &k.pool_fwd, elementwise(bsz * h), "pool_fwd";
            b.zpool.ptr, pool.bias, b.pooled.ptr, b.head_in.ptr, bsz as i32, h as i32,
            self.head_drop())?;
        self.mm(
            bsz,
            dm.c,
            h,
            Mat::n(b.head_in.ptr, h),
            Mat::t(p.classifier.weight, h),
            Mat::n(b.logits.ptr, dm.c),
            false,
        )?;
        Ok(())
    }

    /// Evaluation: the head's bias added to the logits.
    pub(crate) fn logits_bias(&self, p: &Classifier<u64>) -> Result<()> {
        let s = &self.st.stream;
        launch!(s, &self.st.k.bias_add, elementwise(self.dm.b * self.dm.c), "bias_add";
            self.b.logits.ptr, p.classifier.bias, self.dm.b as i32, self.dm.c as i32)
    }

    /// The backward, from the logits (the loss is computed here first) to the embeddings;
    /// every gradient into its place `g` in the flat gradient buffer.
    pub(crate) fn backward(&self, p: &Classifier<u64>, g: &Classifier<u64>) -> Result<()> {
        let (st, b, dm) = (self.st, self.b, self.dm);
        let s = &st.stream;
        let k = &st.k;
        let (n, t, h, nh, d, inter, c) = (dm.n(), dm.t, dm.h, dm.nh, dm.d, dm.inter, dm.c);
        let (bsz, tt) = (dm.b, t * t);
        let scale = (d as f64).powf(-0.5) as f32;

        // Loss: bias added to the logits, dlogits, the head bias's gradient.
        launch!(s, &k.loss_fwd_bwd, shape::loss(), "loss_fwd_bwd";
            b.logits.ptr, p.classifier.bias, self.labels, b.dlogits.ptr, g.classifier.bias,
            b.loss.ptr, b.flag.ptr, bsz as i32, c as i32, self.regression as i32)?;

        // Head: dWc = dlogitsᵀ·head_in, dhead = dlogits·Wc.
        self.mm(
            c,
            h,
            bsz,
            Mat::t(b.dlogits.ptr, c),
            Mat::n(b.head_in.ptr, h),
            Mat::n(g.classifier.weight, h),
            false,
        )?;
        self.mm(
            bsz,
            h,
            c,
            Mat::n(b.dlogits.ptr, c),
            Mat::n(p.classifier.weight, h),
            Mat::n(b.dhead.ptr, h),
            false,
        )?;
        launch!(s, &k.pool_bwd, elementwise(bsz * h), "pool_bwd";
            b.dhead.ptr, b.pooled.ptr, (bsz * h) as i32, self.head_drop())?;
        // Pooler: dWp = dzᵀ·cls, dbp = 1ᵀ·dz, d(cls rows) = dz·Wp (other rows zero).
        let last = b.layers.last().map(|l| l.y2.ptr).unwrap_or(b.x0.ptr);
        self.mm(
            h,
            h,
            bsz,
            Mat::t(b.dhead.ptr, h),
            Mat::n(last, t * h),
            Mat::n(g.bert.pooler.weight, h),
            false,
        )?;
        self.col_sum(b.dhead.ptr, bsz, h, g.bert.pooler.bias)?;
        zero_bytes(s, b.dy.ptr, n * h * 4)?;
        self.mm(
            bsz,
            h,
            h,
            Mat::n(b.dhead.ptr, h),
            Mat::n(p.bert.pooler.weight, h),
            Mat::n(b.dy.ptr, t * h),
            false,
        )?;

        // The encoder, last layer first. `dy` holds the gradient of the layer's output; the
        // gradient of its input is written back into `dy` (its old value is dead by then).
        for l in (0..dm.layers).rev() {
            let (lw, lb, lg) = (&p.bert.layers[l], &b.layers[l], &g.bert.layers[l]);
            let x_in = if l == 0 {
                b.x0.ptr
            } else {
                b.layers[l - 1].y2.ptr
            };
            // Output LayerNorm: dy1 = d(y1) via the residual, da = d(dense output).
            self.ln_bwd(
                b.dy.ptr,
                DropSite::OFF,
                lb.xhat2.ptr,
                lb.inv2.ptr,
                lw.output.layer_norm.weight,
                b.dy1.ptr,
                self.out2_drop(l),
                (
                    lg.output.layer_norm.weight,
                    lg.output.layer_norm.bias,
                    lg.output.dense.bias,
                ),
            )?;
            let out = &lw.output;
            self.mm(
                h,
                inter,
                n,
                Mat::t(b.da.ptr, h),
                Mat::n(lb.g.ptr, inter),
                Mat::n(lg.output.dense.weight, inter),
                false,
            )?;
            self.mm(
                n,
                inter,
                h,
                Mat::n(b.da.ptr, h),
                Mat::n(out.dense.weight, inter),
                Mat::n(b.dg.ptr, inter),
                false,
            )?;
            launch!(s, &k.gelu_bwd, elementwise(n * inter), "gelu_bwd";
                b.dg.ptr, lb.f.ptr, n * inter)?;
            let it = &lw.intermediate;
            self.mm(
                inter,
                h,
                n,
                Mat::t(b.dg.ptr, inter),
                Mat::n(lb.y1.ptr, h),
                Mat::n(lg.intermediate.weight, h),
                false,
            )?;
            self.col_sum(b.dg.ptr, n, inter, lg.intermediate.bias)?;
            self.mm(
                n,
                h,
                inter,
                Mat::n(b.dg.ptr, inter),
                Mat::n(it.weight, h),
                Mat::n(b.dy1.ptr, h),
                true,
            )?;
            // Attention output LayerNorm: dy = d(x) via the residual, da = d(dense output).
            let ao = &lw.attention_output;
            self.ln_bwd(
                b.dy1.ptr,
                DropSite::OFF,
                lb.xhat1.ptr,
                lb.inv1.ptr,
                ao.layer_norm.weight,
                b.dy.ptr,
                self.out1_drop(l),
                (
                    lg.attention_output.layer_norm.weight,
                    lg.attention_output.layer_norm.bias,
                    lg.attention_output.dense.bias,
                ),
            )?;
            self.mm(
                h,
                h,
                n,
                Mat::t(b.da.ptr, h),
                Mat::n(lb.ctx.ptr, h),
                Mat::n(lg.attention_output.dense.weight, h),
                false,
            )?;
            self.mm(
                n,
                h,
                h,
                Mat::n(b.da.ptr, h),
                Mat::n(ao.dense.weight, h),
                Mat::n(b.dctx.ptr, h),
                false,
            )?;
            // Attention, per head over the batch rows.
            let drop = self.attn_drop(l);
            let pused = if drop.threshold != 0 {
                lb.pd.ptr
            } else {
                lb.probs.ptr
            };
            let row = t * 3 * h;
            for hh in 0..nh {
                // dPd = dctx·Vᵀ
                self.mm_batched(
                    t,
                    t,
                    d,
                    Mat::n(b.dctx.at(hh * d), h).every(t * h),
                    Mat::t(lb.qkv.at(2 * h + hh * d), 3 * h).every(row),
                    Mat::n(b.dp.at(hh * tt), t).every(nh * tt),
                )?;
                // dV = Pdᵀ·dctx
                self.mm_batched(
                    t,
                    d,
                    t,
                    Mat::t(pused + (hh * tt * 4) as u64, t).every(nh * tt),
                    Mat::n(b.dctx.at(hh * d), h).every(t * h),
                    Mat::n(b.dqkv.at(2 * h + hh * d), 3 * h).every(row),
                )?;
            }
            launch!(s, &k.softmax_bwd, per_row(bsz * nh * t), "softmax_bwd";
                b.dp.ptr, lb.probs.ptr, (bsz * nh * t) as i32, t as i32, scale, drop)?;
            for hh in 0..nh {
                // dQ = dS·K, dK = dSᵀ·Q
                self.mm_batched(
                    t,
                    d,
                    t,
                    Mat::n(b.dp.at(hh * tt), t).every(nh * tt),
                    Mat::n(lb.qkv.at(h + hh * d), 3 * h).every(row),
                    Mat::n(b.dqkv.at(hh * d), 3 * h).every(row),
                )?;
                self.mm_batched(
                    t,
                    d,
                    t,
                    Mat::t(b.dp.at(hh * tt), t).every(nh * tt),
                    Mat::n(lb.qkv.at(hh * d), 3 * h).every(row),
                    Mat::n(b.dqkv.at(h + hh * d), 3 * h).every(row),
                )?;
            }
            // Q|K|V product: dW₃ = dqkvᵀ·x (Q, K, V weights contiguous in the gradient buffer),
            // db₃ = 1ᵀ·dqkv, dx += dqkv·W₃.
            let ga = &lg.attention;
            self.mm(
                3 * h,
                h,
                n,
                Mat::t(b.dqkv.ptr, 3 * h),
                Mat::n(x_in, h),
                Mat::n(ga.query.weight, h),
                false,
            )?;
            self.col_sum(b.dqkv.ptr, n, 3 * h, ga.query.bias)?;
            self.mm(
                n,
                h,
                3 * h,
                Mat::n(b.dqkv.ptr, 3 * h),
                Mat::n(lb.w3.ptr, h),
                Mat::n(b.dy.ptr, h),
                true,
            )?;
        }

        // Embeddings: LayerNorm (its output dropout on the incoming gradient), scatter-add.
        let e = &p.bert.embeddings;
        let ge = &g.bert.embeddings;
        self.ln_bwd(
            b.dy.ptr,
            self.emb_drop(),
            b.xhat0.ptr,
            b.inv0.ptr,
            e.layer_norm.weight,
            b.dy1.ptr,
            DropSite::OFF,
            (ge.layer_norm.weight, ge.layer_norm.bias, 0),
        )?;
        launch!(s, &k.embed_bwd, elementwise(n * h), "embed_bwd";
            b.dy1.ptr, self.ids, self.types, ge.word_embeddings, ge.position_embeddings,
            ge.token_type_embeddings, n as i32, t as i32, h as i32, self.pad, self.vocab,
            self.ntype)?;
        Ok(())
    }

    /// `dst[1, cols] = 1ᵀ · src[rows, cols]` (a bias gradient) through cuBLAS.
    fn col_sum(&self, src: u64, rows: usize, cols: usize, dst: u64) -> Result<()> {
        self.mm(
            1,
            cols,
            rows,
            Mat::n(self.b.ones.ptr, rows),
            Mat::n(src, cols),
            Mat::n(dst, cols),
            false,
        )
    }

    /// LayerNorm backward over all rows: `dr` (the residual's gradient), `da` (in the
    /// workspace's `da`: `dr` through the input dropout), and the three column sums
    /// `(dw, db, dbias)` into the gradient buffer (`dbias` skipped when 0).
    #[allow(clippy::too_many_arguments)]
    fn ln_bwd(
        &self,
        dy: u64,
        d_out: DropSite,
        xhat: u64,
        inv: u64,
        w: u64,
        dr: u64,
        d_in: DropSite,
        (dw, db, dbias): (u64, u64, u64),
    ) -> Result<()> {
        let s = &self.st.stream;
        let k = &self.st.k;
        let (n, h) = (self.dm.n(), self.dm.h);
        let blocks = n.div_ceil(LN_ROWS);
        let da = if dbias != 0 { self.b.da.ptr } else { 0u64 };
        launch!(s, &k.ln_bwd, shape::ln_bwd(n, h), "ln_bwd";
            dy, d_out, xhat, inv, w, dr, d_in, da, self.b.part.ptr, n as i32, h as i32,
            LN_ROWS as i32)?;
        launch!(s, &k.ln_cols_finish, shape::ln_cols(h), "ln_cols_finish";
            self.b.part.ptr, blocks as i32, h as i32, dw, db, dbias)
    }
}
