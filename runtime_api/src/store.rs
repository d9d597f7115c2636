//! The server's state on disk: one SQLite database, `<state-dir>/kindling.db` (WAL, every
//! commit synced), opened at start and migrated by version (`PRAGMA user_version`).
//!
//! Everything that must outlive the process goes through [`Store`]: the function registry
//! (functions created through the control plane and those of functions.toml, with their
//! event-invoke configuration, published versions and aliases) and the accepted `Event`
//! invocations not yet finished. It
//! is the one seam where a shared database could replace the file when a fleet outgrows
//! one machine, so its methods speak of functions and events, never of SQL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::Context as _;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// The database's file name inside the state dir.
pub const DB_FILE: &str = "kindling.db";

/// Each migration takes the schema from its index to the next version.
const MIGRATIONS: &[&str] = &[
    // 1: the function registry and the durable event queue.
    "CREATE TABLE functions (
         name TEXT PRIMARY KEY,
         record TEXT NOT NULL
     );
     CREATE TABLE events (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         request_id TEXT NOT NULL UNIQUE,
         function TEXT NOT NULL,
         payload BLOB NOT NULL,
         trace_id TEXT,
         client_context TEXT,
         accepted_ms INTEGER NOT NULL,
         attempts INTEGER NOT NULL DEFAULT 0,
         due_ms INTEGER NOT NULL
     );
     CREATE INDEX events_due ON events (due_ms);
     CREATE INDEX events_function ON events (function);",
    // 2: an event whose attempt is over keeps its outcome until its file destination has
    // it, so a crash in between appends the record again instead of running the event.
    "ALTER TABLE events ADD COLUMN settled_file TEXT;
     ALTER TABLE events ADD COLUMN settled_record TEXT;",
    // 3: published versions (immutable snapshots of a function) and aliases; an event
    // keeps the version or alias it was sent to.
    "CREATE TABLE versions (
         function TEXT NOT NULL,
         version INTEGER NOT NULL,
         record TEXT NOT NULL,
         PRIMARY KEY (function, version)
     );
     CREATE TABLE aliases (
         function TEXT NOT NULL,
         name TEXT NOT NULL,
         record TEXT NOT NULL,
         PRIMARY KEY (function, name)
     );
     ALTER TABLE events ADD COLUMN qualifier TEXT;",
    // 4: layers published through the control plane; a name's numbers are never reused.
    "CREATE TABLE layer_names (
         name TEXT PRIMARY KEY,
         last_version INTEGER NOT NULL
     );
     CREATE TABLE layers (
         name TEXT NOT NULL,
         version INTEGER NOT NULL,
         record TEXT NOT NULL,
         PRIMARY KEY (name, version)
     );",
];

/// The version a function's record is when it is not a published one.
pub const LATEST: &str = "$LATEST";

/// Where a function was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// Created through the control plane: it may be updated and deleted there.
    Api,
    /// A `[functions.NAME]` table of functions.toml: read-only through the API (the file
    /// is its source; every start reconciles the registry with the file).
    File,
}

/// A function as the registry keeps it, in Lambda's terms: its `$LATEST`, or one of its
/// published versions (a snapshot, never changed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    /// `$LATEST`, or the published version's number.
    #[serde(default = "latest")]
    pub version: String,
    /// Of `$LATEST`: the highest version number published so far (numbers are never
    /// reused, even once a version is deleted, as Lambda's).
    #[serde(default)]
    pub last_version: u64,
    pub origin: Origin,
    /// The runtime identifier as the caller gave it (`python3.12`, or a Kindling name for
    /// functions.toml).
    pub runtime: String,
    /// Kindling's runtime image that runs it (`python`, `node`, `provided`, ...).
    pub image: String,
    pub handler: String,
    pub memory_mb: u32,
    pub timeout_s: u32,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub description: String,
    /// The code: a zip in the server's content-addressed code store (API functions), or
    /// the folder or zip that functions.toml names.
    pub code: std::path::PathBuf,
    /// Base64 SHA-256 of the zip, as Lambda's `CodeSha256` (empty for a folder).
    pub code_sha256: String,
    pub code_size: u64,
    pub isolation: String,
    /// Environments at most: `reserved_concurrency`, else the server's default.
    pub max_concurrency: usize,
    /// `PutFunctionConcurrency`'s `ReservedConcurrentExecutions`.
    #[serde(default)]
    pub reserved_concurrency: Option<usize>,
    /// ISO 8601, as Lambda's `LastModified`.
    pub last_modified: String,
    pub revision_id: String,
    #[serde(default)]
    pub event_invoke: Option<EventInvokeConfig>,
    /// Its layers (`Layers`), in order.
    #[serde(default)]
    pub layers: Vec<LayerUse>,
    /// Its function URL (`CreateFunctionUrlConfig`).
    #[serde(default)]
    pub url: Option<UrlRecord>,
}

/// A layer version a function uses: its ARN, and its zip in the code store (kept while a
/// function uses it, even once the version is deleted, as Lambda keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerUse {
    pub arn: String,
    pub code: std::path::PathBuf,
    pub code_size: u64,
}

/// A function URL's configuration, as `CreateFunctionUrlConfig` set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UrlRecord {
    /// Its port at the Invoke API's address, taken again at every start.
    pub port: u16,
    pub auth_type: String,
    pub invoke_mode: String,
    /// `Cors`, as given (kept and returned).
    pub cors: Option<serde_json::Value>,
    pub creation_time: String,
    pub last_modified: String,
}

/// A published layer version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub name: String,
    /// Numbered from 1 by [`Store::publish_layer`].
    pub version: u64,
    pub description: String,
    pub compatible_runtimes: Vec<String>,
    pub compatible_architectures: Vec<String>,
    pub license_info: Option<String>,
    pub created_date: String,
    /// The zip in the code store.
    pub code: std::path::PathBuf,
    pub code_sha256: String,
    pub code_size: u64,
}

fn latest() -> String {
    LATEST.to_string()
}

/// An alias: a name for one of a function's versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub name: String,
    /// `$LATEST` or a version number.
    pub function_version: String,
    pub description: String,
    pub revision_id: String,
}

/// `PutFunctionEventInvokeConfig`'s settings (or functions.toml's same keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventInvokeConfig {
    /// Retries after the first attempt fails, 0..=2.
    pub maximum_retry_attempts: u32,
    /// An event older than this is dropped (to the on-failure destination), 60..=21600.
    pub maximum_event_age_s: u32,
    /// Destination ARNs.
    pub on_success: Option<String>,
    pub on_failure: Option<String>,
    pub last_modified: String,
}

impl Default for EventInvokeConfig {
    /// Lambda's defaults: two retries, six hours, no destinations.
    fn default() -> Self {
        Self {
            maximum_retry_attempts: 2,
            maximum_event_age_s: 21_600,
            on_success: None,
            on_failure: None,
            last_modified: String::new(),
        }
    }
}

/// One accepted `Event` invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub request_id: String,
    pub function: String,
    /// The version or alias it was sent to (`None`: `$LATEST`), resolved at each attempt.
    pub qualifier: Option<String>,
    pub payload: Vec<u8>,
    pub trace_id: Option<String>,
    pub client_context: Option<String>,
    /// Unix ms when it was accepted (its age counts from here).
    pub accepted_ms: i64,
    /// Attempts that failed so far.
    pub attempts: u32,
    /// Over already: the file destination (a name in `destinations/`) and the record
    /// still to append to it.
    pub settled: Option<(String, String)>,
}

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(
        "Rate Exceeded: {function} has {events} Event invocations ({bytes} bytes of payload) \
         accepted and not yet run, its limit is {max_events} events or {max_bytes} bytes"
    )]
    Full {
        function: String,
        events: usize,
        bytes: usize,
        max_events: usize,
        max_bytes: usize,
    },
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// The queue's bounds per function.
#[derive(Debug, Clone, Copy)]
pub struct QueueBounds {
    pub events: usize,
    pub bytes: usize,
}

/// The database. Calls are short and serialised on one connection.
#[derive(Debug)]
pub struct Store {
    db: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/kindling.db` and migrates it to the
    /// current version. A database newer than this build is refused, not guessed at.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("{}: cannot create", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        let db = Connection::open(&path).with_context(|| format!("{}", path.display()))?;
        // One server per database (two would each run every queued event): the lock is
        // taken now and held until the connection closes, when the process ends. WAL
        // with FULL sync: an accepted event survives a crash of the process and of the
        // machine.
        let setup = || -> rusqlite::Result<()> {
            db.busy_timeout(std::time::Duration::from_millis(500))?;
            db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "FULL")?;
            db.execute_batch("BEGIN EXCLUSIVE; COMMIT;")
        };
        setup().map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                anyhow::anyhow!(
                    "{}: locked: is another kindling server using this state dir?",
                    path.display()
                )
            }
            _ => anyhow::Error::new(e).context(path.display().to_string()),
        })?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&db).with_context(|| format!("{}: cannot migrate", path.display()))?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every function, by name.
    pub fn functions(&self) -> anyhow::Result<Vec<FunctionRecord>> {
        let db = self.db();
        let mut query = db.prepare("SELECT record FROM functions ORDER BY name")?;
        let rows = query.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(serde_json::from_str(&r?)?)).collect()
    }

    pub fn function(&self, name: &str) -> anyhow::Result<Option<FunctionRecord>> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT record FROM functions WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| Ok(serde_json::from_str(&t)?)).transpose()
    }

    /// Adds a function; `false` when one of that name exists already.
    pub fn insert_function(&self, record: &FunctionRecord) -> anyhow::Result<bool> {
        let changed = self.db().execute(
            "INSERT OR IGNORE INTO functions (name, record) VALUES (?1, ?2)",
            params![record.name, serde_json::to_string(record)?],
        )?;
        Ok(changed == 1)
    }

    /// Replaces a function's record (adding it if it is new).
    pub fn put_function(&self, record: &FunctionRecord) -> anyhow::Result<()> {
        self.db().execute(
            "INSERT INTO functions (name, record) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET record = excluded.record",
            params![record.name, serde_json::to_string(record)?],
        )?;
        Ok(())
    }

    /// Removes a function, its versions, its aliases and the events queued for it;
    /// `false` when there was none.
    pub fn delete_function(&self, name: &str) -> anyhow::Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let gone = tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
        for table in ["versions", "aliases", "events"] {
            tx.execute(&format!("DELETE FROM {table} WHERE function = ?1"), [name])?;
        }
        tx.commit()?;
        Ok(gone == 1)
    }

    /// Publishes `version` (a snapshot of `latest`, whose `last_version` now counts it):
    /// both written at once.
    pub fn publish_version(
        &self,
        latest: &FunctionRecord,
        version: &FunctionRecord,
    ) -> anyhow::Result<()> {
        let number: i64 = version.version.parse()?;
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "UPDATE functions SET record = ?2 WHERE name = ?1",
            params![latest.name, serde_json::to_string(latest)?],
        )?;
        tx.execute(
            "INSERT INTO versions (function, version, record) VALUES (?1, ?2, ?3)",
            params![version.name, number, serde_json::to_string(version)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A function's published versions, oldest first.
    pub fn versions(&self, function: &str) -> anyhow::Result<Vec<FunctionRecord>> {
        let db = self.db();
        let mut query =
            db.prepare("SELECT record FROM versions WHERE function = ?1 ORDER BY version")?;
        let rows = query.query_map([function], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(serde_json::from_str(&r?)?)).collect()
    }

    pub fn version(&self, function: &str, version: u64) -> anyhow::Result<Option<FunctionRecord>> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT record FROM versions WHERE function = ?1 AND version = ?2",
                params![function, i64::try_from(version)?],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| Ok(serde_json::from_str(&t)?)).transpose()
    }

    /// Removes one version and the events queued for it; `false` when there was none.
    pub fn delete_version(&self, function: &str, version: u64) -> anyhow::Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let gone = tx.execute(
            "DELETE FROM versions WHERE function = ?1 AND version = ?2",
            params![function, i64::try_from(version)?],
        )?;
        tx.execute(
            "DELETE FROM events WHERE function = ?1 AND qualifier = ?2",
            params![function, version.to_string()],
        )?;
        tx.commit()?;
        Ok(gone == 1)
    }

    /// A function's aliases, by name.
    pub fn aliases(&self, function: &str) -> anyhow::Result<Vec<AliasRecord>> {
        let db = self.db();
        let mut query =
            db.prepare("SELECT record FROM aliases WHERE function = ?1 ORDER BY name")?;
        let rows = query.query_map([function], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(serde_json::from_str(&r?)?)).collect()
    }

    pub fn alias(&self, function: &str, name: &str) -> anyhow::Result<Option<AliasRecord>> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT record FROM aliases WHERE function = ?1 AND name = ?2",
                [function, name],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| Ok(serde_json::from_str(&t)?)).transpose()
    }

    /// Adds (`new`: only if none of that name exists, else `false`) or replaces an alias.
    pub fn put_alias(
        &self,
        function: &str,
        alias: &AliasRecord,
        new: bool,
    ) -> anyhow::Result<bool> {
        let sql = if new {
            "INSERT OR IGNORE INTO aliases (function, name, record) VALUES (?1, ?2, ?3)"
        } else {
            "INSERT INTO aliases (function, name, record) VALUES (?1, ?2, ?3)
             ON CONFLICT (function, name) DO UPDATE SET record = excluded.record"
        };
        let changed = self.db().execute(
            sql,
            params![function, alias.name, serde_json::to_string(alias)?],
        )?;
        Ok(changed == 1)
    }

    /// Removes an alias and the events queued for it; `false` when there was none.
    pub fn delete_alias(&self, function: &str, name: &str) -> anyhow::Result<bool> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let gone = tx.execute(
            "DELETE FROM aliases WHERE function = ?1 AND name = ?2",
            [function, name],
        )?;
        tx.execute(
            "DELETE FROM events WHERE function = ?1 AND qualifier = ?2",
            [function, name],
        )?;
        tx.commit()?;
        Ok(gone == 1)
    }

    /// The version a qualifier names now: `None` or `$LATEST` is `$LATEST`, a number is
    /// itself (if published), an alias its version; `None` when it names nothing.
    pub fn resolve_qualifier(
        &self,
        function: &str,
        qualifier: Option<&str>,
    ) -> anyhow::Result<Option<String>> {
        match qualifier {
            None | Some(LATEST) => Ok(Some(LATEST.to_string())),
            Some(q) => match version_number(q) {
                Some(n) => Ok(self.version(function, n)?.map(|v| v.version)),
                None => Ok(self.alias(function, q)?.map(|a| a.function_version)),
            },
        }
    }

    /// Whether any function or version runs the code at `code` (as its code or one of
    /// its layers), or a layer version holds it.
    pub fn code_in_use(&self, code: &Path) -> anyhow::Result<bool> {
        let db = self.db();
        let mut query =
            db.prepare("SELECT record FROM functions UNION ALL SELECT record FROM versions")?;
        let mut rows = query.query([])?;
        while let Some(row) = rows.next()? {
            let record: FunctionRecord = serde_json::from_str(&row.get::<_, String>(0)?)?;
            if record.code == code || record.layers.iter().any(|l| l.code == code) {
                return Ok(true);
            }
        }
        drop(rows);
        drop(query);
        let mut query = db.prepare("SELECT record FROM layers")?;
        let mut rows = query.query([])?;
        while let Some(row) = rows.next()? {
            let record: LayerRecord = serde_json::from_str(&row.get::<_, String>(0)?)?;
            if record.code == code {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Publishes a layer version under the next number of its name (`record.version` is
    /// ignored); the record as kept.
    pub fn publish_layer(&self, mut record: LayerRecord) -> anyhow::Result<LayerRecord> {
        let db = self.db();
        let tx = db.unchecked_transaction()?;
        let version: i64 = tx.query_row(
            "INSERT INTO layer_names (name, last_version) VALUES (?1, 1)
             ON CONFLICT (name) DO UPDATE SET last_version = last_version + 1
             RETURNING last_version",
            params![record.name],
            |r| r.get(0),
        )?;
        record.version = u64::try_from(version)?;
        tx.execute(
            "INSERT INTO layers (name, version, record) VALUES (?1, ?2, ?3)",
            params![record.name, version, serde_json::to_string(&record)?],
        )?;
        tx.commit()?;
        Ok(record)
    }

    /// A layer's versions, newest first (every layer's when `name` is `None`).
    pub fn layer_versions(&self, name: Option<&str>) -> anyhow::Result<Vec<LayerRecord>> {
        let db = self.db();
        let mut query = db.prepare(
            "SELECT record FROM layers WHERE ?1 IS NULL OR name = ?1
             ORDER BY name, version DESC",
        )?;
        let rows = query.query_map(params![name], |r| r.get::<_, String>(0))?;
        rows.map(|r| Ok(serde_json::from_str(&r?)?)).collect()
    }

    pub fn layer(&self, name: &str, version: u64) -> anyhow::Result<Option<LayerRecord>> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT record FROM layers WHERE name = ?1 AND version = ?2",
                params![name, i64::try_from(version)?],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| Ok(serde_json::from_str(&t)?)).transpose()
    }

    /// Removes a layer version; `false` when there was none.
    pub fn delete_layer(&self, name: &str, version: u64) -> anyhow::Result<bool> {
        let changed = self.db().execute(
            "DELETE FROM layers WHERE name = ?1 AND version = ?2",
            params![name, i64::try_from(version)?],
        )?;
        Ok(changed == 1)
    }

    /// Accepts an event: once this returns, it survives any crash. Refused when the
    /// function's queued events would pass `bounds`.
    pub fn enqueue(
        &self,
        event: &StoredEvent,
        due_ms: i64,
        bounds: QueueBounds,
    ) -> Result<(), EnqueueError> {
        let mut db = self.db();
        let tx = db.transaction().map_err(anyhow::Error::from)?;
        let (events, bytes): (i64, i64) = tx
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events WHERE function = ?1",
                [&event.function],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(anyhow::Error::from)?;
        let (events, bytes) = (to_usize(events), to_usize(bytes));
        if events >= bounds.events || bytes.saturating_add(event.payload.len()) > bounds.bytes {
            return Err(EnqueueError::Full {
                function: event.function.clone(),
                events,
                bytes,
                max_events: bounds.events,
                max_bytes: bounds.bytes,
            });
        }
        insert_event(&tx, event, due_ms)?;
        tx.commit().map_err(anyhow::Error::from)?;
        Ok(())
    }

    /// Events due by `now_ms`, oldest first, that `take` accepts: it sees each due
    /// event's sequence number and function in turn. Only the payloads of those taken are
    /// read.
    pub fn due_events(
        &self,
        now_ms: i64,
        take: &mut dyn FnMut(i64, &str) -> bool,
    ) -> anyhow::Result<Vec<StoredEvent>> {
        let db = self.db();
        let mut due =
            db.prepare("SELECT seq, function FROM events WHERE due_ms <= ?1 ORDER BY due_ms, seq")?;
        let mut taken = Vec::new();
        let mut rows = due.query([now_ms])?;
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            if take(seq, &row.get::<_, String>(1)?) {
                taken.push(seq);
            }
        }
        let mut read = db.prepare(
            "SELECT seq, request_id, function, payload, trace_id, client_context, accepted_ms, attempts,
                    settled_file, settled_record, qualifier
             FROM events WHERE seq = ?1",
        )?;
        taken
            .into_iter()
            .map(|seq| {
                Ok(read.query_row([seq], |r| {
                    Ok(StoredEvent {
                        seq: r.get(0)?,
                        request_id: r.get(1)?,
                        function: r.get(2)?,
                        qualifier: r.get(10)?,
                        payload: r.get(3)?,
                        trace_id: r.get(4)?,
                        client_context: r.get(5)?,
                        accepted_ms: r.get(6)?,
                        attempts: r.get(7)?,
                        settled: match (r.get(8)?, r.get(9)?) {
                            (Some(file), Some(record)) => Some((file, record)),
                            _ => None,
                        },
                    })
                })?)
            })
            .collect()
    }

    /// When the next event falls due after `now_ms`, if one is queued.
    pub fn next_due_ms(&self, now_ms: i64) -> anyhow::Result<Option<i64>> {
        Ok(self.db().query_row(
            "SELECT MIN(due_ms) FROM events WHERE due_ms > ?1",
            [now_ms],
            |r| r.get(0),
        )?)
    }

    /// A failed attempt: tried again at `due_ms`.
    pub fn retry_event(&self, seq: i64, attempts: u32, due_ms: i64) -> anyhow::Result<()> {
        self.db().execute(
            "UPDATE events SET attempts = ?2, due_ms = ?3 WHERE seq = ?1",
            params![seq, attempts, due_ms],
        )?;
        Ok(())
    }

    /// The event's attempts are over and its record goes to the file destination `file`:
    /// kept with the event until [`Store::finish_event`], so that it is never run again.
    pub fn settle_event(&self, seq: i64, file: &str, record: &str) -> anyhow::Result<()> {
        self.db().execute(
            "UPDATE events SET settled_file = ?2, settled_record = ?3 WHERE seq = ?1",
            params![seq, file, record],
        )?;
        Ok(())
    }

    /// The event is done with; `then` (a destination that is a function) is queued in the
    /// same transaction, so that it is neither lost nor doubled by a crash in between.
    pub fn finish_event(&self, seq: i64, then: Option<(&StoredEvent, i64)>) -> anyhow::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM events WHERE seq = ?1", [seq])?;
        if let Some((event, due_ms)) = then {
            insert_event(&tx, event, due_ms)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Per function: queued events, and the oldest one's acceptance time (Unix ms).
    pub fn queue_stats(&self) -> anyhow::Result<Vec<(String, usize, i64)>> {
        let db = self.db();
        let mut query = db.prepare(
            "SELECT function, COUNT(*), MIN(accepted_ms) FROM events GROUP BY function ORDER BY function",
        )?;
        let rows = query.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, to_usize(r.get(1)?), r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn insert_event(
    tx: &rusqlite::Transaction<'_>,
    event: &StoredEvent,
    due_ms: i64,
) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO events (request_id, function, payload, trace_id, client_context, accepted_ms, attempts, due_ms, qualifier)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            event.request_id,
            event.function,
            event.payload,
            event.trace_id,
            event.client_context,
            event.accepted_ms,
            event.attempts,
            due_ms,
            event.qualifier
        ],
    )?;
    Ok(())
}

/// A published version's number, if `q` is one (digits, as Lambda's versions).
pub fn version_number(q: &str) -> Option<u64> {
    q.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| q.parse().ok())
        .flatten()
}

fn to_usize(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Applies the migrations this database has not seen, each in its own transaction.
fn migrate(db: &Connection) -> anyhow::Result<()> {
    let version: usize = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        anyhow::bail!(
            "the database is at version {version}, newer than this build knows ({}): use a newer kindling",
            MIGRATIONS.len()
        );
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = db.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from + 1)?;
        tx.commit()?;
        tracing::info!(version = from + 1, "database migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> FunctionRecord {
        FunctionRecord {
            name: name.into(),
            version: LATEST.into(),
            last_version: 0,
            origin: Origin::Api,
            runtime: "python3.12".into(),
            image: "python".into(),
            handler: "app.handler".into(),
            memory_mb: 128,
            timeout_s: 3,
            env: BTreeMap::new(),
            role: None,
            description: String::new(),
            code: "/x.zip".into(),
            code_sha256: "abc".into(),
            code_size: 1,
            isolation: "sandbox".into(),
            max_concurrency: 10,
            reserved_concurrency: None,
            last_modified: "now".into(),
            revision_id: "r1".into(),
            event_invoke: None,
            layers: Vec::new(),
            url: None,
        }
    }

    fn event(function: &str, id: &str, bytes: usize) -> StoredEvent {
        StoredEvent {
            seq: 0,
            request_id: id.into(),
            function: function.into(),
            qualifier: None,
            payload: vec![b'x'; bytes],
            trace_id: None,
            client_context: None,
            accepted_ms: 5,
            attempts: 0,
            settled: None,
        }
    }

    #[test]
    fn functions_survive_a_reopen_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.insert_function(&record("a")).unwrap());
        assert!(!store.insert_function(&record("a")).unwrap());
        let mut b = record("b");
        store.put_function(&b).unwrap();
        b.memory_mb = 256;
        store.put_function(&b).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<_> = store
            .functions()
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(store.function("b").unwrap().unwrap().memory_mb, 256);
        assert!(store.delete_function("a").unwrap());
        assert!(!store.delete_function("a").unwrap());
        assert_eq!(store.function("a").unwrap(), None);
    }

    #[test]
    fn the_queue_is_bounded_and_kept_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bounds = QueueBounds {
            events: 2,
            bytes: 10,
        };
        store.enqueue(&event("f", "1", 4), 20, bounds).unwrap();
        store.enqueue(&event("f", "2", 4), 10, bounds).unwrap();
        assert!(matches!(
            store.enqueue(&event("f", "3", 1), 0, bounds),
            Err(EnqueueError::Full { events: 2, .. })
        ));
        assert!(matches!(
            store.enqueue(&event("g", "4", 11), 0, bounds),
            Err(EnqueueError::Full { bytes: 0, .. })
        ));
        let due = store.due_events(15, &mut |_, _| true).unwrap();
        assert_eq!(
            due.iter()
                .map(|e| e.request_id.as_str())
                .collect::<Vec<_>>(),
            ["2"]
        );
        assert_eq!(store.next_due_ms(0).unwrap(), Some(10));
        assert_eq!(store.next_due_ms(15).unwrap(), Some(20));
        assert_eq!(store.next_due_ms(20).unwrap(), None);
        let mut seen = Vec::new();
        let none = store
            .due_events(100, &mut |_, f| {
                seen.push(f.to_string());
                false
            })
            .unwrap();
        assert!(none.is_empty());
        assert_eq!(seen, ["f", "f"]);
        store.retry_event(due[0].seq, 1, 30).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let due = store.due_events(100, &mut |_, _| true).unwrap();
        assert_eq!(
            due.iter()
                .map(|e| (e.request_id.as_str(), e.attempts))
                .collect::<Vec<_>>(),
            [("1", 0), ("2", 1)]
        );
        store.settle_event(due[1].seq, "dlq", "{}").unwrap();
        let settled = store.due_events(100, &mut |_, _| true).unwrap();
        assert_eq!(
            settled[1].settled,
            Some(("dlq".to_string(), "{}".to_string()))
        );
        let next = event("g", "5", 1);
        store.finish_event(due[0].seq, Some((&next, 0))).unwrap();
        assert_eq!(
            store.queue_stats().unwrap(),
            [("f".to_string(), 1, 5), ("g".to_string(), 1, 5)]
        );
        store.delete_function("f").unwrap();
        assert_eq!(store.queue_stats().unwrap().len(), 1);
    }

    #[test]
    fn versions_and_aliases_resolve_and_go_with_their_function() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut latest = record("f");
        store.put_function(&latest).unwrap();
        latest.last_version = 1;
        let mut v1 = latest.clone();
        v1.version = "1".into();
        v1.code = "/v1.zip".into();
        store.publish_version(&latest, &v1).unwrap();
        assert!(
            store.publish_version(&latest, &v1).is_err(),
            "a number is published once"
        );
        let alias = AliasRecord {
            name: "live".into(),
            function_version: "1".into(),
            description: String::new(),
            revision_id: "r".into(),
        };
        assert!(store.put_alias("f", &alias, true).unwrap());
        assert!(!store.put_alias("f", &alias, true).unwrap());
        let mut q = event("f", "q", 1);
        q.qualifier = Some("live".into());
        let bounds = QueueBounds {
            events: 10,
            bytes: 100,
        };
        store.enqueue(&q, 0, bounds).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.function("f").unwrap().unwrap().last_version, 1);
        let due = store.due_events(1, &mut |_, _| true).unwrap();
        assert_eq!(due[0].qualifier.as_deref(), Some("live"));
        for (qualifier, want) in [
            (None, Some("$LATEST")),
            (Some("$LATEST"), Some("$LATEST")),
            (Some("1"), Some("1")),
            (Some("live"), Some("1")),
            (Some("2"), None),
            (Some("dead"), None),
        ] {
            assert_eq!(
                store.resolve_qualifier("f", qualifier).unwrap().as_deref(),
                want,
                "{qualifier:?}"
            );
        }
        assert!(store.code_in_use(Path::new("/v1.zip")).unwrap());
        assert!(store.delete_alias("f", "live").unwrap());
        assert!(store.due_events(1, &mut |_, _| true).unwrap().is_empty());
        assert!(store.delete_version("f", 1).unwrap());
        assert!(!store.code_in_use(Path::new("/v1.zip")).unwrap());
        store.publish_version(&latest, &v1).unwrap();
        store.put_alias("f", &alias, true).unwrap();
        store.delete_function("f").unwrap();
        assert!(store.versions("f").unwrap().is_empty());
        assert!(store.aliases("f").unwrap().is_empty());
        assert_eq!(version_number("12"), Some(12));
        assert_eq!(version_number("1a"), None);
        assert_eq!(version_number(""), None);
    }

    #[test]
    fn one_server_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let err = format!("{:#}", Store::open(dir.path()).unwrap_err());
        assert!(err.contains("another kindling server"), "{err}");
        drop(first);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let db = Connection::open(dir.path().join(DB_FILE)).unwrap();
        db.pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        let err = format!("{:#}", Store::open(dir.path()).unwrap_err());
        assert!(err.contains("version 99"), "{err}");
    }

    #[test]
    fn layer_versions_are_numbered_once_and_keep_their_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let layer = |code: &str| LayerRecord {
            name: "deps".into(),
            version: 0,
            description: String::new(),
            compatible_runtimes: vec!["python3.12".into()],
            compatible_architectures: Vec::new(),
            license_info: None,
            created_date: String::new(),
            code: code.into(),
            code_sha256: String::new(),
            code_size: 1,
        };
        assert_eq!(store.publish_layer(layer("/l1.zip")).unwrap().version, 1);
        assert_eq!(store.publish_layer(layer("/l2.zip")).unwrap().version, 2);
        assert!(store.code_in_use(Path::new("/l1.zip")).unwrap());
        assert!(store.delete_layer("deps", 2).unwrap());
        assert!(!store.delete_layer("deps", 2).unwrap());
        assert!(!store.code_in_use(Path::new("/l2.zip")).unwrap());
        // Numbers are never reused, across a restart too.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.publish_layer(layer("/l3.zip")).unwrap().version, 3);
        let versions: Vec<u64> = store
            .layer_versions(Some("deps"))
            .unwrap()
            .iter()
            .map(|l| l.version)
            .collect();
        assert_eq!(versions, [3, 1]);
        assert_eq!(
            store.layer("deps", 1).unwrap().unwrap().code,
            Path::new("/l1.zip")
        );
        assert!(store.layer("deps", 2).unwrap().is_none());
        // A function that uses a layer keeps its zip.
        let mut f = record("f");
        f.layers.push(LayerUse {
            arn: "arn:aws:lambda:us-east-1:000000000000:layer:deps:1".into(),
            code: "/l1.zip".into(),
            code_size: 1,
        });
        store.put_function(&f).unwrap();
        assert!(store.delete_layer("deps", 1).unwrap());
        assert!(store.code_in_use(Path::new("/l1.zip")).unwrap());
    }
}
