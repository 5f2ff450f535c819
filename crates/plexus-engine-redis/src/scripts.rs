//! The Lua scripts, each run atomically by Redis. They read the clock with `TIME` (Redis's own,
//! so every node agrees on it) and write offsets with `string.format('%d', …)` (Lua numbers
//! are doubles: exact below 2^53).
//!
//! Stream entries have the ID `{offset}-0` and two fields: `d`, the stored publication, and
//! `x`, when it expires (milliseconds since the Unix epoch).

use redis::Script;

/// Appends a publication and announces it.
///
/// KEYS: stream, meta. ARGV: pub/sub channel, stored publication, history size, history ttl
/// (ms), meta ttl (ms), epoch to use if the stream has none, the publish command (`PUBLISH`,
/// or `SPUBLISH` for sharded pub/sub). Returns `{top, epoch}`.
pub const PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
  redis.call('DEL', KEYS[1])
end
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[4])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], string.format('%d-0', top),
  'd', ARGV[2], 'x', string.format('%d', now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], math.max(ttl, tonumber(ARGV[5])))
redis.call(ARGV[7], ARGV[1], 'p' .. string.format('%d', top) .. ':' .. ARGV[2])
return {top, epoch}
";

/// Reads history.
///
/// KEYS: stream, meta. ARGV: epoch to use if the stream has none, lowest offset to return,
/// limit (-1: none), `1` for newest first, meta ttl (ms).
/// Returns `{top, epoch, {offset, stored, offset, stored, …}}`.
pub const HISTORY: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('DEL', KEYS[1])
end
local top = redis.call('HGET', KEYS[2], 'top') or '0'
local limit = tonumber(ARGV[3])
local out = {}
if limit ~= 0 then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local from = ARGV[2] .. '-0'
  local entries
  if ARGV[4] == '1' and limit > 0 then
    -- Newest first: expired entries can only follow the unexpired ones.
    entries = redis.call('XREVRANGE', KEYS[1], '+', from, 'COUNT', limit)
  elseif ARGV[4] == '1' then
    entries = redis.call('XREVRANGE', KEYS[1], '+', from)
  else
    entries = redis.call('XRANGE', KEYS[1], from, '+')
  end
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    local data, expires
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then
        data = fields[i + 1]
      elseif fields[i] == 'x' then
        expires = tonumber(fields[i + 1])
      end
    end
    if data and expires and expires > now then
      out[#out + 1] = string.match(entry[1], '^(%d+)')
      out[#out + 1] = data
      if limit > 0 and #out >= 2 * limit then
        break
      end
    end
  end
end
return {top, epoch, out}
";

/// Adds (or refreshes) a client's presence.
///
/// KEYS: expiry zset, descriptor hash. ARGV: client id, descriptor, ttl (ms).
pub const PRESENCE_ADD: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
";

/// Removes a client's presence.
///
/// KEYS: expiry zset, descriptor hash. ARGV: client id.
pub const PRESENCE_REMOVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";

/// Drops expired presence and returns the descriptors of the clients still present.
///
/// KEYS: expiry zset, descriptor hash.
pub const PRESENCE_GET: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  for i = 1, #expired, 500 do
    redis.call('HDEL', KEYS[2], unpack(expired, i, math.min(i + 499, #expired)))
  end
end
local present = {}
for _, client in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  present[client] = true
end
local out = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if present[all[i]] then
    out[#out + 1] = all[i + 1]
  end
end
return out
";

/// Claims an idempotency key: returns the record held under it, or sets it (pending) and
/// returns nil.
///
/// KEYS: the key's record. ARGV: the pending record, its time to live in ms.
pub const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  return held
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return nil
";

/// Every script, compiled once per process for its hash.
pub struct Scripts {
    pub publish: Script,
    pub history: Script,
    pub presence_add: Script,
    pub presence_remove: Script,
    pub presence_get: Script,
    pub claim: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            publish: Script::new(PUBLISH),
            history: Script::new(HISTORY),
            presence_add: Script::new(PRESENCE_ADD),
            presence_remove: Script::new(PRESENCE_REMOVE),
            presence_get: Script::new(PRESENCE_GET),
            claim: Script::new(CLAIM),
        }
    }

    /// The sources, loaded with `SCRIPT LOAD` on every new connection.
    pub fn sources() -> [&'static str; 6] {
        [
            PUBLISH,
            HISTORY,
            PRESENCE_ADD,
            PRESENCE_REMOVE,
            PRESENCE_GET,
            CLAIM,
        ]
    }
}
