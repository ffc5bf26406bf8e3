//! ModelInfer in either wire form: the request as both forms carry it, its one input read into
//! the engine's images, the engine call, and the outputs encoded as the protocol's raw
//! (little-endian) tensors.

use crate::engine::{self, Call, Engine, ImageInput, ModelInfo};
use crate::error::ServeError;

use super::models::{resolve, Served};
use super::params::{self, Params};

/// A tensor's data as it came: the protocol's raw bytes (gRPC `raw_input_contents`, or a
/// REST binary section: little-endian values, BYTES elements length-prefixed), or typed.
#[derive(Debug, Default)]
pub enum Data {
    #[default]
    Empty,
    Raw(Vec<u8>),
    Bytes(Vec<Vec<u8>>),
    Fp32(Vec<f32>),
}

#[derive(Debug)]
pub struct Input {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    /// The input names a shared-memory region (not supported).
    pub shared_memory: bool,
    pub data: Data,
}

#[derive(Debug)]
pub struct RequestedOutput {
    pub name: String,
    pub classification: bool,
}

#[derive(Debug)]
pub struct InferRequest {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub parameters: Params,
    pub inputs: Vec<Input>,
    pub outputs: Vec<RequestedOutput>,
}

/// One output: raw little-endian values (BOOL one byte each, BYTES length-prefixed).
#[derive(Debug)]
pub struct Output {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
    pub raw: Vec<u8>,
}

#[derive(Debug)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<Output>,
}

/// Resolves the model, checks the parameters and runs the request; an earlier deadline from
/// the `timeout` parameter than the call's own gets a timer of its own (the transport already
/// answers at the call's).
pub async fn infer(
    engine: &Engine,
    req: InferRequest,
    call: Call,
) -> Result<InferResponse, ServeError> {
    let info = engine.info()?;
    let served = resolve(info, &req.model_name, &req.model_version)?;
    params::check(&req.parameters, served)?;
    let given = call.deadline;
    let call = params::with_call_parameters(&req.parameters, call)?;
    let earlier = call.deadline.filter(|_| call.deadline != given);
    engine::within(earlier, run(engine, info, served, req, call)).await
}

async fn run(
    engine: &Engine,
    info: &ModelInfo,
    served: Served,
    mut req: InferRequest,
    call: Call,
) -> Result<InferResponse, ServeError> {
    let cfg = info.config();
    let names = requested(&req, served)?;
    let images = images(&mut req.inputs, cfg.img_size)?;
    let b = images.len() as i64;
    let mut outputs = Vec::with_capacity(names.len());
    let mut push = |name: &str, datatype, shape, raw| {
        outputs.push(Output {
            name: name.into(),
            datatype,
            shape,
            raw,
        })
    };
    match served {
        Served::Embed => {
            let options = params::embed_options(&req.parameters)?;
            let result = engine
                .embed(
                    engine::EmbedRequest {
                        images,
                        pooling: options.pooling,
                        layer: options.layer,
                        normalize: options.normalize,
                        patch_tokens: names.iter().any(|n| n == "patch_tokens"),
                        ..Default::default()
                    },
                    call,
                )
                .await?;
            let e = &result.embeddings;
            // Patch tokens are d wide; the embedding is d or the whitened grid's width.
            let (d, l) = (cfg.dim as i64, cfg.num_patches() as i64);
            let width = e.first().map_or(d, |e| e.values.len() as i64);
            for name in &names {
                match name.as_str() {
                    "embedding" => push(
                        name,
                        "FP32",
                        vec![b, width],
                        f32_bytes(e.iter().flat_map(|e| &e.values)),
                    ),
                    _ => push(
                        name,
                        "FP32",
                        vec![b, l, d],
                        f32_bytes(e.iter().flat_map(|e| &e.patch_tokens)),
                    ),
                }
            }
        }
        Served::Complete => {
            let images = images
                .into_iter()
                .enumerate()
                .map(|(i, image)| Ok((image, params::mask(&req.parameters, i)?)))
                .collect::<Result<_, ServeError>>()?;
            let result = engine
                .complete(
                    engine::CompleteRequest {
                        images,
                        diagnostics: false,
                    },
                    call,
                )
                .await?;
            let l = cfg.num_patches();
            let done = &result.images;
            for name in &names {
                match name.as_str() {
                    "reconstruction" => push(
                        name,
                        "BYTES",
                        vec![b],
                        join_bytes(done.iter().map(|c| c.reconstruction_png.as_slice())),
                    ),
                    "composite" => push(
                        name,
                        "BYTES",
                        vec![b],
                        join_bytes(done.iter().map(|c| c.composite_png.as_slice())),
                    ),
                    "mask" => {
                        let mut mask = vec![0u8; done.len() * l];
                        for (i, c) in done.iter().enumerate() {
                            for &p in &c.masked_patches {
                                mask[i * l + p as usize] = 1;
                            }
                        }
                        push(name, "BOOL", vec![b, l as i64], mask)
                    }
                    _ => push(
                        name,
                        "FP32",
                        vec![b],
                        f32_bytes(done.iter().map(|c| &c.masked_patch_mse)),
                    ),
                }
            }
        }
    }
    Ok(InferResponse {
        model_name: req.model_name,
        model_version: info.version(),
        id: req.id,
        outputs,
    })
}

/// The outputs to send: those asked for, or (as the protocol says) all the listed ones.
fn requested(req: &InferRequest, served: Served) -> Result<Vec<String>, ServeError> {
    let listed = served.outputs();
    if req.outputs.is_empty() {
        return Ok(listed.iter().map(|s| s.to_string()).collect());
    }
    let known = |name: &str| listed.contains(&name) || served.on_request().contains(&name);
    req.outputs
        .iter()
        .map(|o| {
            if o.classification {
                return Err(ServeError::invalid(format!(
                    "output `{}`: classification outputs are not supported",
                    o.name
                )));
            }
            if known(&o.name) {
                Ok(o.name.clone())
            } else {
                Err(ServeError::invalid(format!(
                    "unknown output `{}`; this model has {listed:?}, and {:?} when named",
                    o.name,
                    served.on_request()
                )))
            }
        })
        .collect()
}

/// The images of the one input, as the engine takes them: `image` (BYTES `[B]` or `[B, 1]`,
/// one PNG/JPEG file each) or `pixels` (FP32 `[B, 3, S, S]`).
fn images(inputs: &mut [Input], image_size: usize) -> Result<Vec<ImageInput>, ServeError> {
    let [input] = inputs else {
        return Err(ServeError::invalid(format!(
            "send exactly one input, `image` (BYTES) or `pixels` (FP32); got {}",
            inputs.len()
        )));
    };
    if input.shared_memory {
        return Err(ServeError::invalid(
            "shared-memory inputs are not supported: send the data in the request",
        ));
    }
    let want = |datatype: &str| -> Result<(), ServeError> {
        if input.datatype == datatype {
            Ok(())
        } else {
            Err(ServeError::invalid(format!(
                "input `{}` must be {datatype}, got {}",
                input.name, input.datatype
            )))
        }
    };
    let shape: Vec<usize> = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ServeError::invalid(format!(
                "input `{}` has a negative dimension: {:?}",
                input.name, input.shape
            ))
        })?;
    let data = std::mem::take(&mut input.data);
    match input.name.as_str() {
        "image" => {
            want("BYTES")?;
            let batch = match shape[..] {
                [batch] | [batch, 1] => batch,
                _ => {
                    return Err(ServeError::invalid(format!(
                        "input `image` must have shape [B] or [B, 1], got {:?}",
                        input.shape
                    )))
                }
            };
            let files = match data {
                Data::Raw(raw) => split_bytes(&raw)?,
                Data::Bytes(files) => files,
                Data::Empty => vec![],
                Data::Fp32(_) => {
                    return Err(ServeError::invalid("input `image` carries FP32 contents"))
                }
            };
            if files.len() != batch {
                return Err(ServeError::invalid(format!(
                    "input `image` has shape [{batch}] but {} elements",
                    files.len()
                )));
            }
            Ok(files.into_iter().map(ImageInput::Encoded).collect())
        }
        "pixels" => {
            want("FP32")?;
            let s = image_size;
            let batch = match shape[..] {
                [b, 3, h, w] if h == s && w == s => b,
                _ => {
                    return Err(ServeError::invalid(format!(
                        "input `pixels` must have shape [B, 3, {s}, {s}], got {:?}",
                        input.shape
                    )))
                }
            };
            let values: Vec<f32> = match data {
                Data::Raw(raw) => {
                    if raw.len() % 4 != 0 {
                        return Err(ServeError::invalid(format!(
                            "input `pixels` raw contents are {} bytes, not a whole number of FP32 values",
                            raw.len()
                        )));
                    }
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                }
                Data::Fp32(values) => values,
                Data::Empty => vec![],
                Data::Bytes(_) => {
                    return Err(ServeError::invalid("input `pixels` carries BYTES contents"))
                }
            };
            let plane = 3 * s * s;
            if batch.checked_mul(plane) != Some(values.len()) {
                return Err(ServeError::invalid(format!(
                    "input `pixels` has shape {:?} but {} values were sent",
                    input.shape,
                    values.len()
                )));
            }
            Ok(values
                .chunks(plane)
                .map(|p| ImageInput::Pixels {
                    shape: vec![3, s as u32, s as u32],
                    data: p.to_vec(),
                })
                .collect())
        }
        other => Err(ServeError::invalid(format!(
            "unknown input `{other}`: send `image` (BYTES [B] or [B, 1], PNG/JPEG files) or `pixels` (FP32 [B, 3, {image_size}, {image_size}])"
        ))),
    }
}

/// BYTES raw contents: each element is a 4-byte little-endian length, then the bytes.
pub fn split_bytes(raw: &[u8]) -> Result<Vec<Vec<u8>>, ServeError> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| ServeError::invalid("BYTES raw contents end inside a length prefix"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(ServeError::invalid(format!(
                "BYTES raw contents: an element of {len} bytes with {} left",
                tail.len()
            )));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}

fn join_bytes<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

fn f32_bytes<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    values.flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_round_trip_through_length_prefixes() {
        let items: Vec<&[u8]> = vec![b"png-one", b"", b"three"];
        let raw = join_bytes(items.iter().copied());
        assert_eq!(&raw[..4], &7u32.to_le_bytes());
        let back = split_bytes(&raw).unwrap();
        assert_eq!(back, items.iter().map(|i| i.to_vec()).collect::<Vec<_>>());
        assert!(split_bytes(&raw[..raw.len() - 1]).is_err());
        assert!(split_bytes(&[1, 0]).is_err());
    }
}
