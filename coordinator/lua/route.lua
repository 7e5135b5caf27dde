-- route.lua: fan a run of publishes out to subscriber inboxes and acknowledge the request entries,
-- atomically, fenced by the router lease and the routing version; count or refuse what a full
-- inbox cannot take.
--
-- KEYS[1]   router lease of the partition (string: owner token)
-- KEYS[2]   routing version (string counter: members and subscriptions)
-- KEYS[3]   nonce marks (hash: peer id -> "<nonce> <entry id>" of its last accepted signed request)
-- KEYS[4]   the request stream the run came from
-- KEYS[5]   inbox drops (hash: peer id -> messages a full inbox dropped or refused)
-- KEYS[6]   dead-letter stream (refused deliveries, overflow 'reject')
-- KEYS[7..] target inbox streams
-- ARGV[1]   lease token of the calling router
-- ARGV[2]   routing version the fan-out was computed with
-- ARGV[3]   consumer group of the request stream
-- ARGV[4]   inbox MAXLEN
-- ARGV[5]   number of acks A; ARGV[6] offset D of the deliveries; ARGV[7] the router's consumer name
-- ARGV[8]   number of nonce marks K (authenticated runs: each sender's last signed entry in the run)
-- ARGV[9]   what a full inbox does: 'drop_oldest' (trim its oldest entries, counted) or 'reject'
--           (the new message is dead-lettered for that peer as inbox_full, counted)
-- ARGV[10]  dead-letter MAXLEN
-- ARGV[11]  number of inboxes N; then N peer ids, inbox i (KEYS[6 + i]) belonging to peer i
-- then A request entry ids to acknowledge
-- then K pairs (peer id, "<nonce> <entry id>"), stored in KEYS[3] with the fan-out (unless a
--   higher mark is there), so a router taking over knows exactly which nonces were consumed
-- then records, each: kind ('msg' | 'nr'), message id, topic, data json, sender, timestamp ms, E,
--   then E (field, value) pairs added to the inbox entry (headers, reply-to, ...)
-- from ARGV[D] to the end, deliveries: pairs (record offset, inbox index); the record starting at
--   ARGV[offset] goes to inbox KEYS[6 + index]
-- Returns {"ok", deliveries} | {"lost"} when the lease is not ours | {"stale", version}
--   | {"foreign"} when another consumer holds pending entries of the request stream: a router
--     deposed while paused read them before its writes were refused; they are older, so the caller
--     must claim and route them first (nothing is written)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'lost'}
end
local version = redis.call('GET', KEYS[2]) or '0'
if version ~= ARGV[2] then
  return {'stale', version}
end
local summary = redis.call('XPENDING', KEYS[4], ARGV[3])
if summary[4] then
  for _, c in ipairs(summary[4]) do
    if c[1] ~= ARGV[7] and tonumber(c[2]) > 0 then
      return {'foreign'}
    end
  end
end
local maxlen = tonumber(ARGV[4])
local nacks = tonumber(ARGV[5])
local p = tonumber(ARGV[6])
local nmarks = tonumber(ARGV[8])
local reject = ARGV[9] == 'reject'
local ninboxes = tonumber(ARGV[11])
local a = 12 + ninboxes
local marks = a + nacks

-- the inbox entry of each record, built once however many inboxes it goes to
local built = {}
local function entry(m)
  local fields = built[m]
  if not fields then
    fields = {'k', ARGV[m], 'i', ARGV[m + 1], 't', ARGV[m + 2], 'd', ARGV[m + 3], 's', ARGV[m + 4],
      'ts', ARGV[m + 5]}
    for e = 0, tonumber(ARGV[m + 6]) - 1 do
      fields[#fields + 1] = ARGV[m + 7 + 2 * e]
      fields[#fields + 1] = ARGV[m + 8 + 2 * e]
    end
    built[m] = fields
  end
  return fields
end

local n = 0
local before = {}   -- inbox index -> length before this call (looked up once)
local added = {}
while p < #ARGV do
  local m, i = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
  local key = KEYS[6 + i]
  if not before[i] then
    before[i] = redis.call('XLEN', key)
    added[i] = 0
  end
  if reject and before[i] + added[i] >= maxlen then
    local peer = ARGV[11 + i]
    redis.call('HINCRBY', KEYS[5], peer, 1)
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[10], '*', 'reason', 'inbox_full',
      'message', 'the inbox of ' .. peer .. ' is full (SIDECAR_INBOX_MAXLEN)', 'stream', KEYS[4],
      'entry', ARGV[m + 1], 'sender', ARGV[m + 4], 'peer', peer, 'topic', ARGV[m + 2],
      'raw', string.sub(ARGV[m + 3], 1, 4096))
  else
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(entry(m)))
    added[i] = added[i] + 1
    n = n + 1
  end
  p = p + 2
end
if not reject then  -- what the trim dropped, exactly (MAXLEN ~ trims whole nodes)
  for i, len in pairs(before) do
    if len + added[i] > maxlen then
      local dropped = len + added[i] - redis.call('XLEN', KEYS[6 + i])
      if dropped > 0 then
        redis.call('HINCRBY', KEYS[5], ARGV[11 + i], dropped)
      end
    end
  end
end
-- one XACK for the run (ids in chunks that stay well inside Lua's stack for unpack)
for first = a, a + nacks - 1, 1000 do
  redis.call('XACK', KEYS[4], ARGV[3], unpack(ARGV, first, math.min(first + 999, a + nacks - 1)))
end
for i = 0, nmarks - 1 do  -- a mark only ever rises
  local peer, mark = ARGV[marks + 2 * i], ARGV[marks + 2 * i + 1]
  local old = redis.call('HGET', KEYS[3], peer)
  if not old or (tonumber(string.match(old, '^%d+')) or 0) < tonumber(string.match(mark, '^%d+')) then
    redis.call('HSET', KEYS[3], peer, mark)
  end
end
return {'ok', n}
