"""The Redis store's Lua scripts: every store call that touches more than one key runs as one
script, so it is atomic on the server (a broker node that dies mid-call leaves all or nothing).

Keys of one channel share the hash tag ``{channel}`` (one cluster slot); a script builds the keys
of a group (``<base>:z:<group>``, ``<base>:r:<group>``) from the channel's ``base``, which is in
the same slot. Layout (``base`` = ``<prefix>{<channel>}``):

- ``base:m`` hash: ``last`` (the last seq given), ``added`` (bytes ever appended), ``dropped``;
- ``base:s`` stream: one entry per message, ID ``<seq>-0``, fields ``p`` payload, ``t`` publish
  time, ``n`` size, ``c`` cumulative size (``added`` after it), and when set ``i`` id,
  ``a`` attributes (JSON), ``x`` expiry. The stream's consumer groups are the durable groups:
  their last-delivered-id is the cursor, their PEL the pending list (consumer, attempt = delivery
  count);
- ``base:z:<group>`` sorted set: pending seq (zero-padded) -> deadline;
- ``base:r:<group>`` hash: pending seq (zero-padded) -> reason of the failed attempt (nack);
- ``base:d`` hash id -> seq, and ``base:dt`` sorted set id -> time: the dedupe window.

Numbers that must keep their precision (times) travel as strings and are stored as given; seqs
are formatted with ``%d`` (Lua numbers are doubles: exact up to 2^53).
"""

from __future__ import annotations

#: Flags of the scripts that may add data: refused up front while Redis is out of memory
#: (OOM), so an append fails whole. Scripts that take, ack or remove run even then
#: (``allow-oom``), so consumers can make room again.
_ADDS = "#!lua\n"
_FREES = "#!lua flags=allow-oom\n"
_CROSS = "#!lua flags=allow-cross-slot-keys\n"

COMMON = r"""
local function sid(q) return string.format('%d-0', q) end
local function pkey(q) return string.format('%016d', q) end
local function seq_of(id) return tonumber(string.match(id, '^%d+')) end

local function field(f, name)
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end

-- call cmd (a table of leading args) with items appended, 1000 at a time; the sum of the replies
local function chunked(cmd, items)
  local total = 0
  for i = 1, #items, 1000 do
    local args = {unpack(cmd)}
    for j = i, math.min(i + 999, #items) do args[#args + 1] = items[j] end
    local r = redis.call(unpack(args))
    if type(r) == 'number' then total = total + r end
  end
  return total
end

local function entry(s, q)
  local r = redis.call('XRANGE', s, sid(q), sid(q))
  if #r == 0 then return nil end
  return r[1][2]
end

-- the first live seq (last + 1 when empty) and its fields
local function head(s, last)
  local r = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)
  if #r == 0 then return last + 1, nil end
  return seq_of(r[1][1]), r[1][2]
end

local function cum_before(f) return tonumber(field(f, 'c')) - tonumber(field(f, 'n')) end

local function nbytes(m, s, last)
  local _, f = head(s, last)
  if not f then return 0 end
  return tonumber(redis.call('HGET', m, 'added')) - cum_before(f)
end

-- {name, cursor, pending, consumers} per consumer group of the stream
local function groups(s)
  if redis.call('EXISTS', s) == 0 then return {} end
  local out = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
    local t = {}
    for i = 1, #g, 2 do t[g[i]] = g[i + 1] end
    out[#out + 1] = {t['name'], seq_of(t['last-delivered-id']), t['pending'], t['consumers']}
  end
  return out
end

local function drop_front(s, first, n)
  if n <= 0 then return 0 end
  redis.call('XTRIM', s, 'MINID', sid(first + n))
  return n
end

-- the lowest seq some group still needs: its cursor + 1, or its lowest pending live seq
local function floor(s, first, last)
  local f = last + 1
  for _, g in ipairs(groups(s)) do
    local low = g[2] + 1
    if g[3] > 0 then
      local p = redis.call('XPENDING', s, g[1], sid(first), '+', 1)
      if #p > 0 then low = math.min(low, seq_of(p[1][1])) end
    end
    if low < f then f = low end
  end
  return f
end

local function trim_acked(s, last, keep_from)
  local first = head(s, last)
  local f = floor(s, first, last)
  if keep_from and keep_from < f then f = keep_from end
  return drop_front(s, first, math.min(f, last + 1) - first)
end

local function enforce_size(m, s, last, max_messages, max_bytes)
  local n = 0
  local depth = redis.call('XLEN', s)
  local first, f = head(s, last)
  if depth > max_messages then
    local k = depth - max_messages
    drop_front(s, first, k)
    n, first, depth = n + k, first + k, depth - k
    f = depth > 0 and entry(s, first) or nil
  end
  if f then
    local base = cum_before(f)
    local excess = tonumber(redis.call('HGET', m, 'added')) - base - max_bytes
    if excess > 0 then
      -- the fewest messages from the front whose sizes add up to the excess
      local lo, hi = 1, depth
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        local freed = tonumber(field(entry(s, first + mid - 1), 'c')) - base
        if freed >= excess then hi = mid else lo = mid + 1 end
      end
      drop_front(s, first, lo)
      n = n + lo
    end
  end
  return n
end

local function ensure(m, s, default_group)
  if redis.call('EXISTS', m) == 1 then return 0 end
  redis.call('HSET', m, 'last', '0', 'added', '0', 'dropped', '0')
  if default_group ~= '' then redis.pcall('XGROUP', 'CREATE', s, default_group, '0', 'MKSTREAM') end
  return 1
end

local function prune_dedupe(d, dt, horizon)
  local old = redis.call('ZRANGEBYSCORE', dt, '-inf', horizon)
  if #old > 0 then
    chunked({'HDEL', d}, old)
    redis.call('ZREMRANGEBYSCORE', dt, '-inf', horizon)
  end
end

-- argv[at ..]: now, dedupe horizon, window ('1': record ids), discard ('reject' | 'drop-oldest'),
-- max_messages, max_bytes, default group ('' : none), notify channel, channel, count, then per
-- message: id, payload, attributes, expires_at, size. Returns {created, {seq, dup, ...}} or
-- {created, 'full'}.
local function append(m, s, d, dt, argv, at)
  local now, horizon, window, discard = argv[at], argv[at + 1], argv[at + 2], argv[at + 3]
  local max_messages, max_bytes = tonumber(argv[at + 4]), tonumber(argv[at + 5])
  local notify, channel, count = argv[at + 7], argv[at + 8], tonumber(argv[at + 9])
  local created = ensure(m, s, argv[at + 6])
  prune_dedupe(d, dt, horizon)
  local last = tonumber(redis.call('HGET', m, 'last'))
  local seq = last
  local results, fresh, seen = {}, {}, {}
  local added = 0
  for j = 0, count - 1 do
    local a = at + 10 + 5 * j
    local id = argv[a]
    local hit = false
    if id ~= '' then
      hit = seen[id]
      if not hit then
        local h = redis.call('HGET', d, id)
        if h then hit = tonumber(h) end
      end
    end
    if hit then
      results[#results + 1] = hit
      results[#results + 1] = 1
    else
      seq = seq + 1
      if id ~= '' then seen[id] = seq end
      results[#results + 1] = seq
      results[#results + 1] = 0
      fresh[#fresh + 1] = a
      added = added + tonumber(argv[a + 4])
    end
  end
  if #fresh == 0 then return {created, results} end
  if discard == 'reject' then
    local function over()
      return redis.call('XLEN', s) + #fresh > max_messages or nbytes(m, s, last) + added > max_bytes
    end
    if over() then trim_acked(s, last, nil) end
    if over() then return {created, 'full'} end
  end
  local cum = tonumber(redis.call('HGET', m, 'added'))
  for i, a in ipairs(fresh) do
    cum = cum + tonumber(argv[a + 4])
    local args = {'XADD', s, sid(last + i), 'p', argv[a + 1], 't', now, 'n', argv[a + 4],
                  'c', string.format('%d', cum)}
    if argv[a] ~= '' then args[#args + 1] = 'i'; args[#args + 1] = argv[a] end
    if argv[a + 2] ~= '' then args[#args + 1] = 'a'; args[#args + 1] = argv[a + 2] end
    if argv[a + 3] ~= '' then args[#args + 1] = 'x'; args[#args + 1] = argv[a + 3] end
    redis.call(unpack(args))
  end
  redis.call('HSET', m, 'last', string.format('%d', seq), 'added', string.format('%d', cum))
  if window == '1' then
    for i, a in ipairs(fresh) do
      if argv[a] ~= '' then
        redis.call('HSET', d, argv[a], string.format('%d', last + i))
        redis.call('ZADD', dt, now, argv[a])
      end
    end
  end
  if discard ~= 'reject' then
    local n = enforce_size(m, s, seq, max_messages, max_bytes)
    if n > 0 then redis.call('HINCRBY', m, 'dropped', n) end
  end
  redis.call('PUBLISH', notify, string.format('%d', seq) .. ' ' .. channel)
  return {created, results}
end

-- ack seqs (zero-padded members) in group g; the number that were pending
local function ack(s, z, r, g, members)
  if #members == 0 or redis.call('EXISTS', s) == 0 then return 0 end
  local ids = {}
  for i, mem in ipairs(members) do ids[i] = sid(tonumber(mem)) end
  local n = 0
  for i = 1, #ids, 1000 do
    local r2 = redis.pcall('XACK', s, g, unpack(ids, i, math.min(i + 999, #ids)))
    if type(r2) == 'number' then n = n + r2 end
  end
  chunked({'ZREM', z}, members)
  chunked({'HDEL', r}, members)
  return n
end
"""

# KEYS: m, s, d, dt. ARGV: the append arguments (see `append`).
APPEND = (
    _ADDS
    + COMMON
    + r"""
return append(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV, 1)
"""
)

# KEYS: m, s. ARGV: default group ('' : none). Returns 1 when created.
ENSURE_CHANNEL = (
    _ADDS
    + COMMON
    + r"""
return ensure(KEYS[1], KEYS[2], ARGV[1])
"""
)

# KEYS: m, s. ARGV: group, kind ('cursor' | 'new' | 'earliest' | 'time'), value.
ENSURE_GROUP = (
    _ADDS
    + COMMON
    + r"""
local m, s, g, kind, value = KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3]
ensure(m, s, '')
for _, x in ipairs(groups(s)) do
  if x[1] == g then return 0 end
end
local last = tonumber(redis.call('HGET', m, 'last'))
local first = head(s, last)
local cursor
if kind == 'new' then
  cursor = last
elseif kind == 'earliest' then
  cursor = first - 1
elseif kind == 'cursor' then
  cursor = tonumber(value)
else
  -- the first live message published at or after the time (publish times ascend)
  local t = tonumber(value)
  local lo, hi = first, last + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if tonumber(field(entry(s, mid), 't')) < t then lo = mid + 1 else hi = mid end
  end
  cursor = lo - 1
end
redis.call('XGROUP', 'CREATE', s, g, sid(cursor), 'MKSTREAM')
return 1
"""
)

# KEYS: s, z. ARGV: group, consumer, limit, deadline. Returns the stream entries handed out.
READ_NEW = (
    _FREES
    + COMMON
    + r"""
local s, z = KEYS[1], KEYS[2]
if redis.call('EXISTS', s) == 0 then return {} end
local r = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', s, '>')
if type(r) ~= 'table' or r.err then return {} end
local entries = r[1][2]
local args = {}
for _, e in ipairs(entries) do
  args[#args + 1] = ARGV[4]
  args[#args + 1] = pkey(seq_of(e[1]))
end
chunked({'ZADD', z}, args)
return entries
"""
)

# KEYS: s, z, r, m. ARGV: group, consumer, limit, now, deadline.
# Returns {id, fields, attempt, reason} per claimed entry.
CLAIM = (
    _FREES
    + COMMON
    + r"""
local s, z, r, m = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local g, consumer, limit, now, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
if redis.call('ZCARD', z) == 0 then return {} end
local last = tonumber(redis.call('HGET', m, 'last') or '0')
local first = head(s, last)
local taken = {}
-- due entries in (deadline, seq) order; those whose message is gone leave the pending list
for _ = 1, 10000 do
  if #taken >= limit then break end
  local want = limit - #taken
  local due = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', #taken, want)
  local gone = {}
  for _, mem in ipairs(due) do
    if tonumber(mem) < first then gone[#gone + 1] = mem else taken[#taken + 1] = mem end
  end
  ack(s, z, r, g, gone)
  if #due < want then break end
end
if #taken == 0 then return {} end
local reasons = redis.call('HMGET', r, unpack(taken))
local reason_of = {}
local ids = {}
for i, mem in ipairs(taken) do
  reason_of[mem] = reasons[i]
  ids[i] = sid(tonumber(mem))
end
local claimed = redis.call('XCLAIM', s, g, consumer, 0, unpack(ids))
local out, members, got = {}, {}, {}
for _, e in ipairs(claimed) do
  local mem = pkey(seq_of(e[1]))
  local p = redis.call('XPENDING', s, g, e[1], e[1], 1)
  got[mem] = true
  members[#members + 1] = deadline
  members[#members + 1] = mem
  out[#out + 1] = {e[1], e[2], p[1][4], reason_of[mem] or ''}
end
chunked({'ZADD', z}, members)
chunked({'HDEL', r}, taken)
local lost = {}
for _, mem in ipairs(taken) do
  if not got[mem] then lost[#lost + 1] = mem end
end
chunked({'ZREM', z}, lost)
return out
"""
)

# KEYS: s, z, r. ARGV: group, zero-padded seqs...
ACK = (
    _FREES
    + COMMON
    + r"""
local members = {}
for i = 2, #ARGV do members[#members + 1] = ARGV[i] end
return ack(KEYS[1], KEYS[2], KEYS[3], ARGV[1], members)
"""
)

# KEYS: z, r. ARGV: deadline, reason ('' : keep), zero-padded seqs... (nack and extend)
SET_DEADLINE = (
    _FREES
    + r"""
local z, r, deadline, reason = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  if redis.call('ZSCORE', z, ARGV[i]) then
    redis.call('ZADD', z, deadline, ARGV[i])
    if reason ~= '' then redis.call('HSET', r, ARGV[i], reason) end
    n = n + 1
  end
end
return n
"""
)

# KEYS: s, z, r. ARGV: group, limit. Returns {id, consumer, attempt, deadline, reason} per entry.
PENDING = (
    _FREES
    + COMMON
    + r"""
local s, z, r = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', s) == 0 then return {} end
local p = redis.pcall('XPENDING', s, ARGV[1], '-', '+', ARGV[2])
if type(p) ~= 'table' or p.err then return {} end
local out = {}
for _, e in ipairs(p) do
  local mem = pkey(seq_of(e[1]))
  out[#out + 1] = {e[1], e[2], e[4], redis.call('ZSCORE', z, mem) or '', redis.call('HGET', r, mem) or ''}
end
return out
"""
)

# KEYS: m, s. Returns {exists, last, depth, bytes, first, oldest publish time, dropped,
# {name, cursor, pending} per group}.
STATS = (
    _FREES
    + COMMON
    + r"""
local m, s = KEYS[1], KEYS[2]
if redis.call('EXISTS', m) == 0 then return {0} end
local last = tonumber(redis.call('HGET', m, 'last'))
local first, f = head(s, last)
local oldest, size = '', 0
if f then
  oldest = field(f, 't')
  size = tonumber(redis.call('HGET', m, 'added')) - cum_before(f)
end
local gs = {}
for _, g in ipairs(groups(s)) do gs[#gs + 1] = {g[1], g[2], g[3]} end
return {1, last, redis.call('XLEN', s), size, first, oldest,
        tonumber(redis.call('HGET', m, 'dropped')), gs}
"""
)

# KEYS: s. Returns the group names.
GROUPS = (
    _FREES
    + COMMON
    + r"""
local out = {}
for _, g in ipairs(groups(KEYS[1])) do out[#out + 1] = g[1] end
return out
"""
)

# KEYS: s. ARGV: base, group. Returns 1 when the group existed.
DELETE_GROUP = (
    _FREES
    + r"""
local s, base, g = KEYS[1], ARGV[1], ARGV[2]
if redis.call('EXISTS', s) == 0 then return 0 end
local r = redis.pcall('XGROUP', 'DESTROY', s, g)
redis.call('DEL', base .. ':z:' .. g, base .. ':r:' .. g)
if type(r) == 'number' then return r end
return 0
"""
)

# KEYS: m, s, d, dt. ARGV: keep_from ('' : none), now, age horizon, dedupe horizon,
# max_messages, max_bytes, consumer idle ms before an idle consumer with nothing pending is
# forgotten. Returns {acked, aged, dropped, expired, publish time of the oldest message left}.
TRIM = (
    _FREES
    + COMMON
    + r"""
local m, s, d, dt = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', m) == 0 then return {0, 0, 0, 0} end
local keep_from = ARGV[1] ~= '' and tonumber(ARGV[1]) or nil
local now, horizon = tonumber(ARGV[2]), tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', m, 'last'))
local acked = trim_acked(s, last, keep_from)
local aged, expired = 0, 0
local first, f = head(s, last)
if f then
  if tonumber(field(f, 't')) < horizon then
    -- publish times ascend: the first message young enough
    local lo, hi = first + 1, last + 1
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if tonumber(field(entry(s, mid), 't')) < horizon then lo = mid + 1 else hi = mid end
    end
    aged = lo - first
  end
  -- then the run of messages whose ttl passed (at most 10000 per call)
  local q = first + aged
  local more = true
  while more and q <= last and expired < 10000 do
    local batch = redis.call('XRANGE', s, sid(q), '+', 'COUNT', 32)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      local x = tonumber(field(e[2], 'x') or '0')
      if x > 0 and x <= now then
        expired = expired + 1
        q = q + 1
      else
        more = false
        break
      end
    end
  end
  drop_front(s, first, aged + expired)
end
local dropped = enforce_size(m, s, last, tonumber(ARGV[5]), tonumber(ARGV[6]))
if aged + dropped > 0 then redis.call('HINCRBY', m, 'dropped', aged + dropped) end
prune_dedupe(d, dt, ARGV[4])
-- consumers are made by XREADGROUP/XCLAIM and never go by themselves: forget idle ones that
-- hold nothing (a consumer that comes back is simply made again)
local idle = tonumber(ARGV[7])
for _, g in ipairs(groups(s)) do
  if g[4] > 0 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, g[1])) do
      local t = {}
      for i = 1, #c, 2 do t[c[i]] = c[i + 1] end
      if t['pending'] == 0 and t['idle'] >= idle then
        redis.call('XGROUP', 'DELCONSUMER', s, g[1], t['name'])
      end
    end
  end
end
local _, left = head(s, last)
return {acked, aged, dropped, expired, left and field(left, 't') or ''}
"""
)

# KEYS: m, s. ARGV: base. Returns how many messages were removed.
PURGE = (
    _FREES
    + COMMON
    + r"""
local m, s, base = KEYS[1], KEYS[2], ARGV[1]
if redis.call('EXISTS', m) == 0 then return 0 end
local last = tonumber(redis.call('HGET', m, 'last'))
local n = redis.call('XLEN', s)
if n > 0 then redis.call('XTRIM', s, 'MAXLEN', 0) end
for _, g in ipairs(groups(s)) do
  redis.call('XGROUP', 'DESTROY', s, g[1])
  redis.call('XGROUP', 'CREATE', s, g[1], sid(math.max(g[2], last)), 'MKSTREAM')
  redis.call('DEL', base .. ':z:' .. g[1], base .. ':r:' .. g[1])
end
return n
"""
)

# KEYS: m, s, d, dt. ARGV: base. Returns 1 when the channel existed.
DELETE = (
    _FREES
    + COMMON
    + r"""
local m, s, base = KEYS[1], KEYS[2], ARGV[1]
local existed = redis.call('EXISTS', m)
for _, g in ipairs(groups(s)) do
  redis.call('DEL', base .. ':z:' .. g[1], base .. ':r:' .. g[1])
end
redis.call('DEL', m, s, KEYS[3], KEYS[4])
return existed
"""
)

# Standalone Redis only (the keys of two channels: two slots in a cluster).
# KEYS: origin s, z, r, then the dead-letter channel's m, s, d, dt.
# ARGV: group, count of seqs, zero-padded seqs..., then the append arguments.
DEAD_LETTER = (
    _CROSS
    + COMMON
    + r"""
local n = tonumber(ARGV[2])
local members = {}
for i = 3, 2 + n do members[#members + 1] = ARGV[i] end
local res = append(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV, 3 + n)
if res[2] == 'full' then return res end
ack(KEYS[1], KEYS[2], KEYS[3], ARGV[1], members)
return res
"""
)

ALL = {
    "append": APPEND,
    "ensure_channel": ENSURE_CHANNEL,
    "ensure_group": ENSURE_GROUP,
    "read_new": READ_NEW,
    "claim": CLAIM,
    "ack": ACK,
    "set_deadline": SET_DEADLINE,
    "pending": PENDING,
    "stats": STATS,
    "groups": GROUPS,
    "delete_group": DELETE_GROUP,
    "trim": TRIM,
    "purge": PURGE,
    "delete": DELETE,
    "dead_letter": DEAD_LETTER,
}
