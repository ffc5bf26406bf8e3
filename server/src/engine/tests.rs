//! The engine with a fake model: lifecycle, faults and their statuses, without a transport.

use std::sync::Arc;
use std::time::Duration;

use super::fake::{mean, FakeModel, Faults, IMAGE_SIZE};
use super::*;

fn config() -> EngineConfig {
    EngineConfig {
        model_name: "crate-mae".into(),
        max_batch_size: 4,
        max_batch_delay: Duration::ZERO,
        max_queue_images: 64,
        max_images_per_request: 8,
        max_image_pixels: 1 << 20,
        max_decode_mib: 64,
        complete_cost: 2.0,
        diagnostics_every: 0,
        diagnostics_interval: Duration::ZERO,
        threading: Some(Threading {
            workers: 1,
            threads: 1,
            adaptive: false,
        }),
    }
}

fn pixels(first: f32) -> ImageInput {
    let n = 3 * IMAGE_SIZE * IMAGE_SIZE;
    let mut data = vec![0.5; n];
    data[0] = first;
    ImageInput::Pixels {
        shape: vec![3, IMAGE_SIZE as u32, IMAGE_SIZE as u32],
        data,
    }
}

fn embed(images: Vec<ImageInput>) -> EmbedRequest {
    EmbedRequest {
        images,
        ..EmbedRequest::default()
    }
}

const UNARY: Call = Call {
    deadline: None,
    priority: Priority::Online,
};

/// Starts an engine on the fake model and waits until it serves.
async fn serving(faults: Faults) -> (Arc<Engine>, Arc<FakeModel>) {
    let model = Arc::new(FakeModel::new(faults));
    let shared = Arc::clone(&model);
    let engine = Engine::start(config(), move || Ok(SharedFake(shared))).unwrap();
    let mut state = engine.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == State::Serving),
    )
    .await
    .unwrap()
    .unwrap();
    (engine, model)
}

/// Lets a test keep a handle on the fake the engine owns.
struct SharedFake(Arc<FakeModel>);

impl Backend for SharedFake {
    fn facts(&self) -> &ModelFacts {
        self.0.facts()
    }
    fn embed(
        &self,
        p: backend::PixelBatch<'_>,
        t: &[&EmbedTask],
        s: bool,
    ) -> Result<backend::EmbedOutputs, ServeError> {
        self.0.embed(p, t, s)
    }
    fn complete(
        &self,
        p: backend::PixelBatch<'_>,
        t: &[&CompleteTask],
    ) -> Result<Vec<CompletedPixels>, ServeError> {
        self.0.complete(p, t)
    }
    fn warm_up(&self, b: usize, decoder: bool) -> Result<(), ServeError> {
        self.0.warm_up(b, decoder)
    }
    fn parallel_batches(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_then_serving_then_draining() {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let engine = Engine::start(config(), move || {
        wait.recv().unwrap();
        Ok(FakeModel::new(Faults::default()))
    })
    .unwrap();
    assert_eq!(*engine.state().borrow(), State::Loading);
    let refused = engine.embed(embed(vec![pixels(0.0)]), UNARY).await;
    assert!(
        matches!(&refused, Err(ServeError::Unavailable(m)) if m.contains("loading")),
        "{refused:?}"
    );
    release.send(()).unwrap();
    let mut state = engine.state();
    state.wait_for(|s| *s == State::Serving).await.unwrap();
    let info = engine.info().unwrap();
    assert_eq!(info.version(), "f".repeat(64));
    let ok = engine.embed(embed(vec![pixels(1.0)]), UNARY).await.unwrap();
    assert_eq!(ok.embeddings.len(), 1);
    engine.begin_drain();
    assert_eq!(*engine.state().borrow(), State::Draining);
    assert!(matches!(
        engine.embed(embed(vec![pixels(1.0)]), UNARY).await,
        Err(ServeError::Unavailable(_))
    ));
    engine.shutdown(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_load_fails_the_engine_with_the_reason() {
    let engine = Engine::start(config(), || -> Result<FakeModel, String> {
        Err("no such file".into())
    })
    .unwrap();
    let mut state = engine.state();
    let failed = state
        .wait_for(|s| matches!(s, State::Failed(_)))
        .await
        .unwrap()
        .clone();
    assert_eq!(failed, State::Failed("no such file".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_model_fails_only_its_batch() {
    let (engine, _) = serving(Faults {
        panic_on: Some(777.25),
        ..Faults::default()
    })
    .await;
    let failed = engine.embed(embed(vec![pixels(777.25)]), UNARY).await;
    assert!(
        matches!(&failed, Err(ServeError::Internal(m)) if m.contains("trigger")),
        "{failed:?}"
    );
    let ok = engine.embed(embed(vec![pixels(2.0)]), UNARY).await.unwrap();
    let expected = mean(&{
        let mut v = vec![0.5; 3 * IMAGE_SIZE * IMAGE_SIZE];
        v[0] = 2.0;
        v
    });
    assert_eq!(ok.embeddings[0].values[0], expected);
    assert_eq!(*engine.state().borrow(), State::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_batches_are_retried_in_halves() {
    let (engine, model) = serving(Faults {
        memory_for: Some(1),
        ..Faults::default()
    })
    .await;
    let images = (0..4).map(|i| pixels(i as f32)).collect();
    let ok = engine.embed(embed(images), UNARY).await.unwrap();
    let firsts: Vec<f32> = ok.embeddings.iter().map(|e| e.values[0]).collect();
    assert_eq!(firsts.len(), 4);
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "request order kept: {firsts:?}"
    );
    assert_eq!(*model.batches.lock().unwrap(), vec![4, 2, 1, 1, 2, 1, 1]);
    assert_eq!(*engine.state().borrow(), State::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_never_fits_is_resource_exhausted() {
    let (engine, _) = serving(Faults {
        memory_for: Some(0),
        ..Faults::default()
    })
    .await;
    let refused = engine.embed(embed(vec![pixels(1.0)]), UNARY).await;
    assert!(
        matches!(&refused, Err(ServeError::ResourceExhausted(m)) if m.contains("memory")),
        "{refused:?}"
    );
    assert_eq!(*engine.state().borrow(), State::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_stops_serving_and_fails_what_is_queued() {
    let (engine, _) = serving(Faults {
        lose_device_on: Some(13.0),
        batch_time: Duration::from_millis(50),
        ..Faults::default()
    })
    .await;
    let first = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.embed(embed(vec![pixels(13.0)]), UNARY).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let queued = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.embed(embed(vec![pixels(1.0)]), UNARY).await })
    };
    assert!(matches!(
        first.await.unwrap(),
        Err(ServeError::DeviceLost(_))
    ));
    let queued = queued.await.unwrap();
    assert!(
        matches!(&queued, Err(ServeError::Unavailable(_))) || queued.is_ok(),
        "queued behind the failure: refused or (if it raced ahead) served: {queued:?}"
    );
    assert!(matches!(*engine.state().borrow(), State::Failed(_)));
    assert!(matches!(
        engine.embed(embed(vec![pixels(1.0)]), UNARY).await,
        Err(ServeError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_reason() {
    let (engine, _) = serving(Faults::default()).await;
    let none = engine.embed(embed(vec![]), UNARY).await;
    assert!(matches!(none, Err(ServeError::InvalidArgument(_))));
    let many = engine
        .embed(embed((0..9).map(|_| pixels(0.0)).collect()), UNARY)
        .await;
    assert!(matches!(many, Err(ServeError::ResourceExhausted(_))));
    let deep = engine
        .embed(
            EmbedRequest {
                layer: Some(2),
                ..embed(vec![pixels(0.0)])
            },
            UNARY,
        )
        .await;
    assert!(
        matches!(&deep, Err(ServeError::InvalidArgument(m)) if m.contains("0 to 1 inclusive")),
        "{deep:?}"
    );
    let bad = engine
        .embed(
            embed(vec![
                pixels(0.0),
                ImageInput::Pixels {
                    shape: vec![3, 2, 2],
                    data: vec![0.0; 12],
                },
            ]),
            UNARY,
        )
        .await;
    assert!(
        matches!(&bad, Err(ServeError::InvalidArgument(m)) if m.starts_with("image 1:")),
        "{bad:?}"
    );
    let hides_nothing = engine
        .complete(
            CompleteRequest {
                images: vec![(pixels(0.0), MaskSpec::Patches(vec![]))],
                diagnostics: false,
            },
            UNARY,
        )
        .await;
    assert!(matches!(hides_nothing, Err(ServeError::InvalidArgument(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unspecified_pooling_is_the_models_recommendation() {
    let (engine, _) = serving(Faults::default()).await;
    assert_eq!(
        engine.info().unwrap().facts.recommended_pooling,
        crate_mae::Pooling::Mean
    );
    let unspecified = engine.embed(embed(vec![pixels(9.0)]), UNARY).await.unwrap();
    let cls = engine
        .embed(
            EmbedRequest {
                pooling: Some(crate_mae::Pooling::Cls),
                ..embed(vec![pixels(9.0)])
            },
            UNARY,
        )
        .await
        .unwrap();
    assert_eq!(
        cls.embeddings[0].values[0], 9.0,
        "explicit cls is still cls"
    );
    assert!(
        unspecified.embeddings[0].values[0] < 1.0,
        "unspecified is the mean: {:?}",
        unspecified.embeddings[0].values
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_come_back_as_pictures_with_their_mask() {
    let (engine, _) = serving(Faults::default()).await;
    let out = engine
        .complete(
            CompleteRequest {
                images: vec![(
                    pixels(0.0),
                    MaskSpec::Random {
                        ratio: 0.5,
                        seed: 3,
                    },
                )],
                diagnostics: false,
            },
            UNARY,
        )
        .await
        .unwrap();
    assert_eq!(out.images[0].masked_patches.len(), 2, "half of 4 patches");
    assert!(out.images[0].composite_png.starts_with(b"\x89PNG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_asking_for_traces_run_after_the_rest_of_their_batch() {
    let (engine, model) = serving(Faults {
        batch_time: Duration::from_millis(150),
        ..Faults::default()
    })
    .await;
    // Occupy the worker, then queue a request asking for diagnostics and one that does not:
    // they land in the same batch of 4.
    let busy = {
        let engine = Arc::clone(&engine);
        tokio::spawn(async move { engine.embed(embed(vec![pixels(9.0)]), UNARY).await })
    };
    while model.batches.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let asking = EmbedRequest {
        diagnostics: true,
        ..embed(vec![pixels(1.0)])
    };
    let plain = embed(vec![pixels(2.0), pixels(3.0), pixels(4.0)]);
    let started = std::time::Instant::now();
    let answered = |r: Result<EmbedResult, ServeError>| (r.unwrap(), started.elapsed());
    let (asking, plain) = tokio::join!(
        async { answered(engine.embed(asking, UNARY).await) },
        async { answered(engine.embed(plain, UNARY).await) },
    );
    busy.await.unwrap().unwrap();
    assert_eq!(*model.batches.lock().unwrap(), vec![1, 3, 1]);
    assert_eq!(*model.traced.lock().unwrap(), vec![false, false, true]);
    let values: Vec<f32> = plain.0.embeddings.iter().map(|e| e.values[0]).collect();
    let expected = |first: f32| {
        let mut image = vec![0.5; 3 * IMAGE_SIZE * IMAGE_SIZE];
        image[0] = first;
        mean(&image)
    };
    assert_eq!(values, [expected(2.0), expected(3.0), expected(4.0)]);
    assert_eq!(
        plain.0.timing.batch_size, 3,
        "the plain images' batch is their own"
    );
    assert!(
        plain.1 + Duration::from_millis(100) < asking.1,
        "the plain images are answered first: {:?} vs {:?}",
        plain.1,
        asking.1
    );
}
