//! The probation flags of `axum_server`, the same as `http_server`'s: `--probation-ms N`
//! (`Options::probation`, 0), `--health-path PATH` (`Options::health_http`),
//! `--health-interval-ms N` (500), `--health-threshold N` (3). Included with
//! `#[path = "shared/probation.rs"] mod probation;` after `mod app;`.

/// Applies `flag` to `options` if it is a probation flag; `None` if it is not.
pub fn flag(
    options: &handover::Options,
    flag: &str,
    value: &mut crate::app::Value<'_>,
) -> Result<Option<handover::Options>, String> {
    let options = options.clone();
    Ok(Some(match flag {
        "--probation-ms" => options.probation(value.ms()?),
        "--health-path" => options.health_http(value.string()?),
        "--health-interval-ms" => options.health_interval(value.ms()?),
        "--health-threshold" => options.health_threshold(value.number()?),
        _ => return Ok(None),
    }))
}
