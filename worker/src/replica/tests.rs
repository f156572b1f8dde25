use super::*;
use crate::model::tests::torch_rng;
use forger_common::init::initial_parameters;

fn spec(filters: [u32; 3], dropout: f64) -> ModelSpec {
    ModelSpec {
        d_filters: filters.to_vec(),
        g_filters: filters.to_vec(),
        dropout,
        ..ModelSpec::default()
    }
}

/// A replica holding Glorot parameters and plausible running statistics.
fn loaded(model: &ModelSpec, size: usize, kind: Kind) -> Replica {
    tch::set_num_threads(1);
    let mut replica = Replica::with_kind(model, size, Device::Cpu, kind).unwrap();
    let d = initial_parameters(&layout::discriminator_layout(model, size), 1);
    let g = initial_parameters(&layout::generator_layout(model), 2);
    replica.set_params(Net::Discriminator, &d).unwrap();
    replica.set_params(Net::Generator, &g).unwrap();
    let running: Vec<f32> = (0..layout::batch_norm_stats_len(model))
        .map(|i| 0.5 + (i % 7) as f32 * 0.1)
        .collect();
    replica.set_batch_norm_running(&running).unwrap();
    replica
}

fn images(count: i64, size: i64) -> Tensor {
    tch::manual_seed(11);
    Tensor::rand([count, 3, size, size], (Kind::Float, Device::Cpu))
}

fn value(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn replica_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Replica>();
}

#[test]
fn bad_specs_are_rejected() {
    let err = Replica::new(&spec([4, 2, 2], 0.0), 42, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("image size 42"), "{err}");
    let mut model = spec([4, 2, 2], 0.0);
    model.g_filters = vec![4, 2];
    let err = Replica::new(&model, 40, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("g_filters"), "{err}");
}

#[test]
fn a_store_that_differs_from_the_layout_is_named() {
    let store = nn::VarStore::new(Device::Cpu);
    Discriminator::new(&store.root(), &spec([4, 2, 2], 0.0), 40).unwrap();
    let other = layout::discriminator_layout(&spec([4, 2, 3], 0.0), 40);
    let err = ordered_variables(&store, &other, Net::Discriminator).unwrap_err();
    assert_eq!(
        err.to_string(),
        "discriminator variables do not match the layout: `conv3.bias` has shape [2], the layout [3]"
    );
    let store = nn::VarStore::new(Device::Cpu);
    Generator::new(&store.root(), &spec([4, 2, 2], 0.0), 40).unwrap();
    let _ = store.root().zeros("extra", &[1]);
    let g_layout = layout::generator_layout(&spec([4, 2, 2], 0.0));
    let err = ordered_variables(&store, &g_layout, Net::Generator).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("found `extra` where the layout has `fc.bias`"),
        "{err}"
    );
}

#[test]
fn loaded_parameters_read_back_exactly_and_the_crc_sees_one_value() {
    let _rng = torch_rng();
    let model = spec([8, 4, 2], 0.0);
    let mut replica = loaded(&model, 40, Kind::Float);
    let mut d = initial_parameters(&layout::discriminator_layout(&model, 40), 1);
    let g = initial_parameters(&layout::generator_layout(&model), 2);
    assert_eq!(replica.params(Net::Discriminator).unwrap(), d);
    assert_eq!(replica.params(Net::Generator).unwrap(), g);
    let bn = replica.batch_norm_running().unwrap();
    let crc = replica.params_crc32().unwrap();
    assert_eq!(crc, wire::crc32_of(&[&d, &g, &bn]));
    d[1234] += 1e-3;
    replica.set_params(Net::Discriminator, &d).unwrap();
    assert_ne!(replica.params_crc32().unwrap(), crc);
    let err = replica.set_params(Net::Generator, &d).unwrap_err();
    assert!(matches!(err, WorkerError::Length { .. }), "{err}");
}

#[test]
fn parameters_loaded_chunk_by_chunk_equal_the_whole_buffer_loaded_at_once() {
    let model = spec([8, 4, 2], 0.0);
    let mut whole = loaded(&model, 40, Kind::Float);
    let mut chunked = loaded(&model, 40, Kind::Float);
    for net in [Net::Discriminator, Net::Generator] {
        let values: Vec<f32> = whole.params(net).unwrap().iter().map(|w| w * 0.5 - 0.25).collect();
        whole.set_params(net, &values).unwrap();
        // Uneven chunks that start and end inside variables.
        let mut bytes = Vec::new();
        wire::f32_to_le_bytes(&values, &mut bytes);
        let mut offset = 0;
        for size in [1, 37, 500].iter().cycle() {
            let end = (offset + size).min(values.len());
            chunked
                .set_params_chunk(net, offset, &bytes[offset * 4..end * 4])
                .unwrap();
            offset = end;
            if offset == values.len() {
                break;
            }
        }
        assert_eq!(chunked.params(net).unwrap(), values);
        assert!(
            chunked.set_params_chunk(net, values.len() - 1, &bytes[..8]).is_err(),
            "past the end"
        );
        assert!(
            chunked.set_params_chunk(net, 0, &bytes[..6]).is_err(),
            "not whole values"
        );
    }
    assert!(chunked.d_vars.iter().chain(&chunked.g_vars).all(Tensor::requires_grad));
}

#[test]
fn equal_replicas_give_bit_identical_contributions() {
    let _rng = torch_rng();
    let model = spec([8, 4, 2], 0.5);
    let (mut a, mut b) = (loaded(&model, 40, Kind::Float), loaded(&model, 40, Kind::Float));
    let (x, z) = (images(4, 40), noise(9, 4, 16, Device::Cpu).unwrap());
    let d = a.discriminator_gradient(&x, &z, 77).unwrap();
    assert_eq!(d, b.discriminator_gradient(&x, &z, 77).unwrap());
    assert_eq!(d.samples, 4);
    assert_eq!(d.gradient.len(), layout::discriminator_layout(&model, 40).numel());
    assert_eq!(d.bn_stats.len(), layout::batch_norm_stats_len(&model));
    let g = a.generator_gradient(&z, 78).unwrap();
    assert_eq!(g, b.generator_gradient(&z, 78).unwrap());
    assert_eq!(g.gradient.len(), layout::generator_layout(&model).numel());
    // The same call again: gradients were zeroed, not accumulated.
    assert_eq!(g, a.generator_gradient(&z, 78).unwrap());
    assert_eq!(d, a.discriminator_gradient(&x, &z, 77).unwrap());
    // The discriminator is trainable again after the generator's step.
    assert!(a.d_vars.iter().all(Tensor::requires_grad));
}

#[test]
fn a_step_reusing_its_forward_pass_equals_one_recomputing_it_bit_for_bit() {
    let _rng = torch_rng();
    for dropout in [0.0, 0.5] {
        let model = spec([8, 4, 2], dropout);
        let (mut kept, mut recomputed) = (loaded(&model, 40, Kind::Float), loaded(&model, 40, Kind::Float));
        let (x, z) = (images(4, 40), noise(9, 4, 16, Device::Cpu).unwrap());
        let (sums, mut batch) = kept.evaluate_step(x.shallow_clone(), z.shallow_clone()).unwrap();
        assert_eq!(
            batch.d_loss.is_some(),
            dropout == 0.0,
            "the pass is kept only without dropout"
        );
        assert_eq!(sums, recomputed.evaluate(&x, &z).unwrap());
        let d = kept.discriminator_phase(&mut batch, 77).unwrap();
        assert_eq!(d, recomputed.discriminator_gradient(&x, &z, 77).unwrap());
        // The G phase must go through the updated discriminator, not the one evaluated.
        let updated: Vec<f32> = kept
            .params(Net::Discriminator)
            .unwrap()
            .iter()
            .map(|w| w * 0.9)
            .collect();
        kept.set_params(Net::Discriminator, &updated).unwrap();
        recomputed.set_params(Net::Discriminator, &updated).unwrap();
        let g = kept.generator_phase(&mut batch, 78).unwrap();
        assert_eq!(g, recomputed.generator_gradient(&z, 78).unwrap());
        assert!(kept.d_vars.iter().all(Tensor::requires_grad));
    }
}

#[test]
fn dropout_changes_the_gradient_and_its_seed_matters() {
    let _rng = torch_rng();
    let (x, z) = (images(4, 40), noise(9, 4, 16, Device::Cpu).unwrap());
    let mut plain = loaded(&spec([8, 4, 2], 0.0), 40, Kind::Float);
    let mut dropped = loaded(&spec([8, 4, 2], 0.5), 40, Kind::Float);
    let p1 = plain.discriminator_gradient(&x, &z, 1).unwrap();
    assert_eq!(p1, plain.discriminator_gradient(&x, &z, 2).unwrap());
    let d1 = dropped.discriminator_gradient(&x, &z, 1).unwrap();
    assert_ne!(p1.gradient, d1.gradient);
    assert_ne!(d1.gradient, dropped.discriminator_gradient(&x, &z, 2).unwrap().gradient);
}

#[test]
fn evaluate_sums_are_batch_means_times_the_batch_size() {
    let _rng = torch_rng();
    let model = spec([8, 4, 2], 0.6);
    let replica = loaded(&model, 40, Kind::Float);
    let (x, z) = (images(6, 40), noise(3, 6, 16, Device::Cpu).unwrap());
    let sums = replica.evaluate(&x, &z).unwrap();
    assert_eq!(sums.samples, 6);
    // Independently: libtorch's own BCE on the networks' outputs, dropout off.
    let (real_p, fake_p) = tch::no_grad(|| {
        let (fake, _) = replica.g.forward_train(&z, 0.0).unwrap();
        (
            replica.d.forward(&x, 0.0).unwrap(),
            replica.d.forward(&fake, 0.0).unwrap(),
        )
    });
    let bce = |p: &Tensor, label: f64| {
        value(&p.binary_cross_entropy::<Tensor>(&p.full_like(label), None, tch::Reduction::Mean))
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-5 * b.abs().max(1.0);
    assert!(close(sums.sum_d_real / 6.0, bce(&real_p, 1.0)), "{sums:?}");
    assert!(close(sums.sum_d_fake / 6.0, bce(&fake_p, 0.0)), "{sums:?}");
    assert!(close(sums.sum_g / 6.0, bce(&fake_p, 1.0)), "{sums:?}");
    // And the losses the gradients differentiate, with dropout off, agree.
    let (xi, zi, _) = replica.inputs(&x, &z).unwrap();
    let (loss_d, _) = tch::no_grad(|| replica.discriminator_loss(&xi, &zi, 0.0)).unwrap();
    let (loss_g, _) = tch::no_grad(|| replica.generator_loss(&zi, 0.0)).unwrap();
    assert!(close(0.5 * (sums.sum_d_real + sums.sum_d_fake), 6.0 * value(&loss_d)));
    assert!(close(sums.sum_g, 6.0 * value(&loss_g)));
}

/// Nudges element `index` of `var` by `delta`, in the variable's own precision.
fn nudge(var: &Tensor, index: i64, delta: f64) {
    tch::no_grad(|| {
        let mut element = var.view([-1]).get(index);
        let _ = element.f_add_scalar_(delta).unwrap();
    });
}

/// Central differences of `loss` against the analytic gradient at the first and last
/// element of every variable, in f64.
fn check_gradient(vars: &[Tensor], gradient: &[f32], mut loss: impl FnMut() -> f64) {
    let h = 1e-5;
    let mut offset = 0;
    for var in vars {
        let n = var.numel();
        for index in [0, n - 1] {
            nudge(var, index as i64, h);
            let up = loss();
            nudge(var, index as i64, -2.0 * h);
            let down = loss();
            nudge(var, index as i64, h);
            let numeric = (up - down) / (2.0 * h);
            let analytic = f64::from(gradient[offset + index]);
            assert!(
                (numeric - analytic).abs() < 1e-7 + 1e-4 * analytic.abs(),
                "element {index} of a {:?} variable: numeric {numeric}, analytic {analytic}",
                var.size()
            );
        }
        offset += n;
    }
    assert_eq!(offset, gradient.len());
}

#[test]
fn gradients_match_finite_differences() {
    let _rng = torch_rng();
    let model = ModelSpec {
        noise_dim: 5,
        ..spec([3, 2, 2], 0.5)
    };
    let mut replica = loaded(&model, 8, Kind::Double);
    let (x, z) = (images(4, 8), noise(4, 4, 5, Device::Cpu).unwrap());
    let (seed_d, seed_g) = (21, 22);
    let d = replica.discriminator_gradient(&x, &z, seed_d).unwrap();
    let g = replica.generator_gradient(&z, seed_g).unwrap();
    let (xi, zi, _) = replica.inputs(&x, &z).unwrap();
    // Reseeding before each evaluation redraws the very same dropout masks.
    let d_loss = || {
        tch::manual_seed(seed_d as i64);
        value(&tch::no_grad(|| replica.discriminator_loss(&xi, &zi, 0.5)).unwrap().0)
    };
    check_gradient(&replica.d_vars, &d.gradient, d_loss);
    let g_loss = || {
        tch::manual_seed(seed_g as i64);
        value(&tch::no_grad(|| replica.generator_loss(&zi, 0.5)).unwrap().0)
    };
    check_gradient(&replica.g_vars, &g.gradient, g_loss);
}

#[test]
fn samples_are_hwc_bytes_of_the_inference_generator() {
    let _rng = torch_rng();
    let model = spec([8, 4, 2], 0.5);
    let replica = loaded(&model, 40, Kind::Float);
    let z = noise(5, 3, 16, Device::Cpu).unwrap();
    let bytes = replica.sample(&z).unwrap();
    assert_eq!(bytes.len(), 3 * 40 * 40 * 3);
    let images = tch::no_grad(|| replica.g.forward_sample(&z, &replica.bn_running)).unwrap();
    let (n, y, x, c) = (2, 7, 31, 1);
    let expected = grid::unit_to_u8(&[images.double_value(&[n, c, y, x]) as f32])[0];
    assert_eq!(bytes[(((n * 40 + y) * 40 + x) * 3 + c) as usize], expected);
    // With running statistics an image does not depend on the rest of its batch.
    assert_eq!(replica.sample(&z.narrow(0, 0, 1)).unwrap()[..], bytes[..40 * 40 * 3]);
}

#[test]
fn batches_come_from_the_store_as_chw_floats() {
    let replica = Replica::new(&spec([4, 2, 2], 0.0), 8, Device::Cpu).unwrap();
    let pixels: Vec<u8> = (0..5 * 8 * 8 * 3).map(|i| (i % 251) as u8).collect();
    let store = Tensor::from_slice(&pixels).reshape([5, 8, 8, 3]);
    let batch = replica.batch(&store, &[3, 0]).unwrap();
    assert_eq!(batch.size(), [2, 3, 8, 8]);
    let (y, x, c) = (5, 2, 2);
    let byte = pixels[((3 * 8 + y) * 8 + x) * 3 + c];
    assert_eq!(
        batch.double_value(&[0, c as i64, y as i64, x as i64]),
        f64::from(f32::from(byte) / 255.0)
    );
    let wrong = Tensor::zeros([5, 3, 8, 8], (Kind::Uint8, Device::Cpu));
    assert!(replica.batch(&wrong, &[0]).is_err());
}

#[test]
fn noise_is_the_common_uniform_noise() {
    let z = noise(42, 3, 16, Device::Cpu).unwrap();
    assert_eq!(z.size(), [3, 16]);
    let flat = Vec::<f32>::try_from(&z.reshape([-1])).unwrap();
    assert_eq!(flat, seeds::uniform_noise(42, 3, 16));
}

#[test]
fn mismatched_inputs_are_shape_errors() {
    let _rng = torch_rng();
    let replica = Replica::new(&spec([4, 2, 2], 0.0), 8, Device::Cpu).unwrap();
    let z = noise(1, 3, 16, Device::Cpu).unwrap();
    let err = replica.evaluate(&images(2, 8), &z).unwrap_err();
    assert_eq!(err.to_string(), "noise has shape [3, 16], expected [2, 16]");
    assert!(replica.evaluate(&images(3, 12), &z).is_err());
}

/// Step timings for the report: `cargo test -p forger-worker --lib -- --ignored --nocapture`.
#[test]
#[ignore = "slow: times the article model"]
fn time_one_step() {
    let _rng = torch_rng();
    for filters in [[64, 32, 16], [256, 128, 64]] {
        let model = spec(filters, 0.6);
        let mut replica = loaded(&model, 40, Kind::Float);
        let (x, z) = (images(16, 40), noise(1, 16, 16, Device::Cpu).unwrap());
        for threads in [1, 2] {
            tch::set_num_threads(threads);
            replica.discriminator_gradient(&x, &z, 1).unwrap();
            replica.generator_gradient(&z, 2).unwrap();
            let mut d_times = Vec::new();
            let mut g_times = Vec::new();
            for i in 0..3 {
                let start = std::time::Instant::now();
                replica.discriminator_gradient(&x, &z, i).unwrap();
                d_times.push(start.elapsed().as_secs_f64());
                let start = std::time::Instant::now();
                replica.generator_gradient(&z, i).unwrap();
                g_times.push(start.elapsed().as_secs_f64());
            }
            let start = std::time::Instant::now();
            replica.evaluate(&x, &z).unwrap();
            let eval = start.elapsed().as_secs_f64();
            d_times.sort_by(f64::total_cmp);
            g_times.sort_by(f64::total_cmp);
            println!(
                "filters {filters:?} threads {threads}: discriminator_gradient {:.3} s, generator_gradient {:.3} s, evaluate {eval:.3} s (medians of 3, batch 16)",
                d_times[1], g_times[1]
            );
        }
    }
    tch::set_num_threads(1);
}
