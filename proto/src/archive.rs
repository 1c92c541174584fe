//! The client side of a remote WAL archive (`lockstep://HOST:PORT`, the `WalArchive` service
//! of a coordinator), and `open_archive`, which opens any archive URL.

use std::sync::Arc;

use futures::future::BoxFuture;
use lockstep_repository::archive::{MAX_PAGE, PageStart, RemoteWal, SegmentPage, WalArchive};
use lockstep_repository::seal::Seal;
use lockstep_repository::wal::SegmentInfo;
use lockstep_repository::{Error, ErrorCode, Lineage, Repository, Result, Seq, ShardId};
use tonic::transport::Channel;

use crate::auth::Identity;
use crate::from_status;
use crate::tls::{Security, endpoint};
use crate::v1::{self, wal_archive_client::WalArchiveClient};
use crate::wire::{lineage_from_wire, lineage_to_wire};

/// The URL scheme of a remote archive.
pub const SCHEME: &str = "lockstep://";

/// Largest message a segment travels in (a segment holds at most `--wal-segment-mib` of raw
/// batches, 4 MiB by default).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Opens a WAL archive: `lockstep://HOST:PORT` for a coordinator's archive endpoint, any
/// repository URL or path otherwise. The coordinator is reached over TLS when `security` is
/// TLS (and its certificate must name `lockstep://coordinator`), in plaintext otherwise.
/// Segments are sealed and opened with `seal`, the keys of the repository the archive serves
/// (`Repository::seal`); no archive holds keys of its own.
pub async fn open_archive(url: &str, security: &Security, seal: &Seal) -> Result<WalArchive> {
    let Some(address) = url.strip_prefix(SCHEME) else {
        return Ok(WalArchive::Store(
            Repository::open_archive(url, seal).await?,
        ));
    };
    let scheme = match security {
        Security::Plaintext => "http",
        Security::Tls(_) => "https",
    };
    let target = endpoint(
        &format!("{scheme}://{address}"),
        security,
        Identity::Coordinator,
    )
    .map_err(|err| err.context(format!("WAL archive {url}: write lockstep://HOST:PORT")))?;
    Ok(remote(url, target.with(channel_settings).lazy(), seal))
}

/// The longest one archive call (a segment put or get of up to `MAX_MESSAGE_BYTES`) may take.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The channel settings of a remote archive: the long-lived settings, every call bounded by
/// `CALL_TIMEOUT`.
pub fn channel_settings(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    crate::long_lived(endpoint).timeout(CALL_TIMEOUT)
}

/// The remote archive `url` reached through `channel` (the simulations pass one over their
/// network), its segments sealed with `seal`.
pub fn remote(url: &str, channel: Channel, seal: &Seal) -> WalArchive {
    let client = WalArchiveClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    WalArchive::Remote {
        url: url.to_string(),
        remote: Arc::new(Remote {
            url: url.to_string(),
            client,
        }),
        seal: seal.clone(),
    }
}

struct Remote {
    url: String,
    client: WalArchiveClient<Channel>,
}

impl Remote {
    /// The archive's own error, or `ERR_STORAGE_UNAVAILABLE` when it cannot be reached.
    fn failed(&self, what: &str, status: &tonic::Status) -> Error {
        let err = from_status(&format!("{what} at {}", self.url), status);
        if err.code == ErrorCode::AgentUnavailable {
            return Error {
                code: ErrorCode::StorageUnavailable,
                ..err
            };
        }
        err
    }

    /// `ListWalSegments` of `shard`'s `lineage`, as `request` asks.
    async fn list_segments(
        &self,
        shard: &ShardId,
        lineage: &Lineage,
        request: v1::ListWalSegmentsRequest,
    ) -> Result<v1::ListWalSegmentsReply> {
        let reply = self
            .client
            .clone()
            .list_segments(v1::ListWalSegmentsRequest {
                shard_id: shard.to_string(),
                lineage: Some(lineage_to_wire(lineage)),
                ..request
            })
            .await
            .map_err(|s| self.failed("list WAL segments", &s))?;
        Ok(reply.into_inner())
    }
}

impl RemoteWal for Remote {
    fn lineages<'a>(&'a self, shard: &'a ShardId) -> BoxFuture<'a, Result<Vec<Lineage>>> {
        Box::pin(async move {
            let reply = self
                .client
                .clone()
                .list_lineages(v1::ListWalLineagesRequest {
                    shard_id: shard.to_string(),
                })
                .await
                .map_err(|s| self.failed("list WAL lineages", &s))?;
            reply
                .into_inner()
                .lineages
                .iter()
                .map(|l| lineage_from_wire(Some(l), "a listed lineage"))
                .collect()
        })
    }

    fn segment_page<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
        start: &'a PageStart,
        up_to: Seq,
    ) -> BoxFuture<'a, Result<SegmentPage>> {
        Box::pin(async move {
            let (start_after, mark_for) = match start {
                PageStart::Beginning => (String::new(), None),
                PageStart::After(name) => (name.clone(), None),
                PageStart::AfterMarkFor(seq) => (String::new(), Some(seq.0)),
            };
            let request = v1::ListWalSegmentsRequest {
                page_size: MAX_PAGE as u32,
                start_after,
                mark_for,
                up_to: if up_to == Seq::MAX { 0 } else { up_to.0 },
                ..Default::default()
            };
            let reply = self.list_segments(shard, lineage, request).await?;
            Ok(SegmentPage {
                segments: reply
                    .names
                    .iter()
                    .filter_map(|name| SegmentInfo::parse(shard, lineage, name))
                    .collect(),
                more: reply.more,
                began_after: Some(reply.began_after).filter(|name| !name.is_empty()),
            })
        })
    }

    fn last_segment_name<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            // An older archive sends every name: the end is the one reaching furthest.
            let request = v1::ListWalSegmentsRequest {
                last_only: true,
                ..Default::default()
            };
            Ok(self
                .list_segments(shard, lineage, request)
                .await?
                .names
                .into_iter()
                .max_by_key(|name| name.split('-').nth(1).and_then(|l| l.parse::<u64>().ok())))
        })
    }

    fn put<'a>(&'a self, info: &'a SegmentInfo, stored: Vec<u8>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.client
                .clone()
                .put_segment(v1::PutWalSegmentRequest {
                    shard_id: info.shard_id.to_string(),
                    lineage: Some(lineage_to_wire(&info.lineage)),
                    name: info.file_name(),
                    stored,
                })
                .await
                .map_err(|s| self.failed("ship WAL segment", &s))?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, info: &'a SegmentInfo) -> BoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move {
            let reply = self
                .client
                .clone()
                .get_segment(v1::GetWalSegmentRequest {
                    shard_id: info.shard_id.to_string(),
                    lineage: Some(lineage_to_wire(&info.lineage)),
                    name: info.file_name(),
                })
                .await
                .map_err(|s| self.failed("download WAL segment", &s))?;
            Ok(reply.into_inner().stored)
        })
    }

    fn delete<'a>(
        &'a self,
        shard: &'a ShardId,
        lineage: &'a Lineage,
        names: Vec<String>,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let reply = self
                .client
                .clone()
                .delete_segments(v1::DeleteWalSegmentsRequest {
                    shard_id: shard.to_string(),
                    lineage: Some(lineage_to_wire(lineage)),
                    names,
                })
                .await
                .map_err(|s| self.failed("remove WAL segments", &s))?;
            Ok(reply.into_inner().deleted)
        })
    }
}
