use super::*;
use std::sync::{Mutex, MutexGuard};
use tch::Device;

/// libtorch has one process-wide generator and the test harness runs tests in parallel:
/// every test that seeds or draws from it holds this, so no other test's draws interleave.
pub(crate) fn torch_rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn small(filters: u32) -> ModelSpec {
    ModelSpec {
        d_filters: vec![4 * filters, 2 * filters, filters],
        g_filters: vec![4 * filters, 2 * filters, filters],
        ..ModelSpec::default()
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

fn numel(store: &nn::VarStore) -> usize {
    store.trainable_variables().iter().map(Tensor::numel).sum()
}

#[test]
fn same_padding_puts_the_odd_pixel_after() {
    assert_eq!(same_padding(40, 2), (1, 2));
    assert_eq!(same_padding(41, 2), (2, 2));
    assert_eq!(same_padding(40, 1), (2, 2));
}

#[test]
fn strided_conv_pads_one_before_and_two_after_as_tf_does() {
    tch::set_num_threads(1);
    // Distinct taps, so each output names the tap that reached it.
    let taps: Vec<f32> = (0..25).map(|i| (10 * (i / 5) + i % 5 + 1) as f32).collect();
    let weight = Tensor::from_slice(&taps).reshape([1, 1, 5, 5]);
    let bias = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let impulse = |y: i64, x: i64| {
        let t = Tensor::zeros([1, 1, 40, 40], (Kind::Float, Device::Cpu));
        let _ = t.get(0).get(0).get(y).get(x).fill_(1.0);
        conv2d_same(&t, &weight, &bias, 2).unwrap()
    };
    // Output i reads inputs 2i - 1 ..= 2i + 3.
    let first = impulse(0, 0);
    assert_eq!(first.size(), [1, 1, 20, 20]);
    assert_eq!(first.double_value(&[0, 0, 0, 0]), 12.0); // tap (1, 1)
    assert_eq!(first.sum(Kind::Double).double_value(&[]), 12.0);
    let last = impulse(39, 39);
    assert_eq!(last.double_value(&[0, 0, 18, 18]), 45.0); // tap (4, 4)
    assert_eq!(last.double_value(&[0, 0, 19, 19]), 23.0); // tap (2, 2)
    assert_eq!(last.double_value(&[0, 0, 18, 19]), 43.0); // tap (4, 2)
    assert_eq!(last.double_value(&[0, 0, 19, 18]), 25.0); // tap (2, 4)
    assert_eq!(last.sum(Kind::Double).double_value(&[]), 45.0 + 23.0 + 43.0 + 25.0);
}

#[test]
fn transposed_conv_is_the_adjoint_of_the_same_conv() {
    let _rng = torch_rng();
    tch::set_num_threads(1);
    let opts = (Kind::Double, Device::Cpu);
    tch::manual_seed(3);
    for (stride, side) in [(2, 10), (1, 12)] {
        // Transposed: 3 channels of side `side` -> 2 of side `stride * side`.
        let weight = Tensor::randn([3, 2, 5, 5], opts);
        let small = Tensor::randn([2, 3, side, side], opts);
        let big = Tensor::randn([2, 2, stride * side, stride * side], opts);
        let up = conv_transpose2d_same(&small, &weight, &Tensor::zeros([2], opts), stride).unwrap();
        let down = conv2d_same(&big, &weight, &Tensor::zeros([3], opts), stride).unwrap();
        assert_eq!(up.size(), big.size());
        assert_eq!(down.size(), small.size());
        let lhs = (&up * &big).sum(Kind::Double).double_value(&[]);
        let rhs = (&down * &small).sum(Kind::Double).double_value(&[]);
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "stride {stride}: {lhs} vs {rhs}"
        );
    }
}

#[test]
fn legacy_bilinear_samples_without_half_pixel_centres() {
    let m = legacy_bilinear_matrix(4, 10);
    let row = |r: usize| &m[r * 4..r * 4 + 4];
    assert_eq!(row(0), [1.0, 0.0, 0.0, 0.0]);
    assert_eq!(row(5), [0.0, 0.0, 1.0, 0.0]); // 5 * 0.4 = 2
    assert_eq!(row(9), [0.0, 0.0, 0.0, 1.0]); // 3.6 clamps to the last pixel
    let expected = [0.6, 0.4, 0.0, 0.0];
    assert!(
        row(1).iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6),
        "{:?}",
        row(1)
    );
    assert!(m.chunks(4).all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-6));
}

#[test]
fn generator_resizes_rows_and_columns() {
    let store = nn::VarStore::new(Device::Cpu);
    let g = Generator::new(&store.root(), &small(2), 40).unwrap();
    let seed: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let x = Tensor::from_slice(&seed).reshape([1, 1, 4, 4]);
    let out = g.resize.matmul(&x).matmul(&g.resize_t);
    assert_eq!(out.size(), [1, 1, 10, 10]);
    let at = |y, x| out.double_value(&[0, 0, y, x]);
    assert_eq!(at(9, 9), 15.0);
    assert!((at(1, 0) - (0.6 * 0.0 + 0.4 * 4.0)).abs() < 1e-5); // down a column
    assert!((at(0, 1) - (0.6 * 0.0 + 0.4 * 1.0)).abs() < 1e-5); // along a row
}

#[test]
fn output_shapes_follow_the_image_size() {
    let _rng = torch_rng();
    tch::set_num_threads(1);
    for size in [40, 48] {
        let spec = small(4);
        let (d_store, g_store) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
        let d = Discriminator::new(&d_store.root(), &spec, size).unwrap();
        let g = Generator::new(&g_store.root(), &spec, size).unwrap();
        let noise = Tensor::rand([5, 16], (Kind::Float, Device::Cpu));
        let (images, stats) = g.forward_train(&noise, 0.5).unwrap();
        assert_eq!(images.size(), [5, 3, size as i64, size as i64]);
        assert_eq!(stats.len(), layout::batch_norm_stats_len(&spec));
        assert_eq!(d.forward(&images, 0.5).unwrap().size(), [5, 1]);
        let running = Tensor::ones([stats.len() as i64], (Kind::Float, Device::Cpu));
        assert_eq!(g.forward_sample(&noise, &running).unwrap().size(), images.size());
    }
}

#[test]
fn article_model_has_the_article_parameter_counts() {
    let spec = ModelSpec::default();
    let (d_store, g_store) = (nn::VarStore::new(Device::Cpu), nn::VarStore::new(Device::Cpu));
    Discriminator::new(&d_store.root(), &spec, 40).unwrap();
    Generator::new(&g_store.root(), &spec, 40).unwrap();
    assert_eq!(numel(&d_store), 4_320_705);
    assert_eq!(numel(&g_store), 1_049_763);
}

#[test]
fn batch_norm_shifts_each_channel_to_beta_with_unit_scale() {
    let _rng = torch_rng();
    tch::set_num_threads(1);
    let store = nn::VarStore::new(Device::Cpu);
    let g = Generator::new(&store.root(), &small(1), 40).unwrap();
    let opts = (Kind::Double, Device::Cpu);
    tch::manual_seed(5);
    let betas = [0.5, -1.0, 2.0, 0.0];
    let mut beta = g.beta[1].shallow_clone();
    tch::no_grad(|| beta.copy_(&Tensor::from_slice(&betas)));
    // Channel scales 0.01 .. 3 so epsilon's effect shows.
    let scales = Tensor::from_slice(&[0.01, 0.1, 1.0, 3.0])
        .to_kind(Kind::Double)
        .view([1, 4, 1, 1]);
    let x = (Tensor::randn([6, 4, 5, 5], opts) * scales + 7.0).to_kind(Kind::Float);
    let (mut offset, mut stats) = (0, Vec::new());
    let y = g.batch_norm(&x, 1, Norm::Batch, &mut offset, &mut stats).unwrap();
    assert_eq!(offset, 8);
    let x64 = x.to_kind(Kind::Double);
    let v_in = values(&x64.var_correction(&[0, 2, 3][..], 0, false));
    let mean_out = values(&y.mean_dim(&[0, 2, 3][..], false, None::<Kind>));
    let var_out = values(&y.to_kind(Kind::Double).var_correction(&[0, 2, 3][..], 0, false));
    for c in 0..4 {
        assert!(
            (mean_out[c] - betas[c]).abs() < 1e-4,
            "channel {c} mean {}",
            mean_out[c]
        );
        let expected = v_in[c] / (v_in[c] + BN_EPSILON);
        assert!(
            (var_out[c] - expected).abs() < 1e-4 * expected.max(1e-2),
            "channel {c}: {} vs {expected}",
            var_out[c]
        );
    }
    // The recorded statistics: batch means and unbiased (n = 150) variances.
    let mean_in = values(&x64.mean_dim(&[0, 2, 3][..], false, None::<Kind>));
    let unbiased = values(&x64.var_correction(&[0, 2, 3][..], 1, false));
    let (m, v) = (values(&stats[0]), values(&stats[1]));
    for c in 0..4 {
        assert!((m[c] - mean_in[c]).abs() < 1e-5);
        assert!((v[c] - unbiased[c]).abs() < 1e-5 * unbiased[c].max(1e-3));
    }
    // Running statistics normalise with exactly the values given: means 7, variances 4.
    let running = Tensor::from_slice(&[[7.0f32; 4], [4.0; 4]].concat());
    let mut offset = 0;
    let y = g
        .batch_norm(&x, 1, Norm::Running(&running), &mut offset, &mut Vec::new())
        .unwrap();
    let want = (&x64 - 7.0) / (4.0f64 + BN_EPSILON).sqrt() + Tensor::from_slice(&betas).view([1, 4, 1, 1]);
    let err = (y.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
    assert!(err < 1e-5, "{err}");
}
