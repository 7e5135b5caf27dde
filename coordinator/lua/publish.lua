-- publish.lua: the direct data path. A peer's run of publishes (and answers to requests) goes
-- straight into its subscribers' inboxes in one atomic step, with no router hop: the caller
-- resolved each topic's subscribers from the route index at routing version ARGV[1], and this
-- script delivers only if that version is still current (else it writes nothing and answers
-- 'stale', and the caller resolves again). Used while the sidecar runs without signing and
-- enforcement and SIDECAR_DATA_PATH is not 'routed' (coordinator.routing.direct); otherwise every
-- publish goes through the router. A site's NATS bridge delivers other sites' messages with it
-- too, in any mode ('fwd' messages, coordinator.federation).
--
-- KEYS[1] routing version (string)        KEYS[2] members zset       KEYS[3] leader hash
-- KEYS[4] router stats (hash: rejected; the publisher counts routed and delivered itself and adds
--         them now and then, which spares two commands a call)            KEYS[5] inbox drops (hash)
-- KEYS[6] dead-letter stream              KEYS[7] queue group turns (hash: "<queue> <pattern>" -> n)
-- KEYS[8] last batch applied per sender (hash: peer id -> batch key)
-- KEYS[9] the site's bridge lease         KEYS[10] last stream sequence the bridge delivered
-- KEYS[11..] inbox streams; inbox i is KEYS[10 + i]
-- ARGV[1] routing version the routes were resolved at   ARGV[2] sender peer id
-- ARGV[3] inbox MAXLEN   ARGV[4] full inbox: 'drop_oldest' | 'reject'   ARGV[5] dead-letter MAXLEN
-- ARGV[6] largest payload (bytes)   ARGV[7] largest headers (bytes)   ARGV[8] longest ttl (ms)
-- ARGV[9] batch key: the last message id of a batch with queue group deliveries, or '': a batch
--         whose key is the sender's last applied one is the same batch sent again after its reply
--         was lost, and is not applied twice, so a retry cannot hand a group's message to a second
--         member (plain subscribers drop such repeats themselves, by message id)
-- ARGV[10] the bridge's lease token ('' for a peer): only the holder of KEYS[9] may send 'fwd'
-- ARGV[11] number of inboxes N, then N peer ids (inbox i belongs to peer i)
-- then the number of messages M, then M messages, each one of:
--   'msg', message id, topic, data json, fence term or '', ttl ms or '', headers json or '',
--     requester inbox index or '' (a request: the sender's own inbox, for 'no responders'),
--     D, D inbox indices (plain subscribers),
--     G, G groups each: queue, pattern, K, K member inbox indices (one member gets the message)
--   'rep', request's message id, requester inbox index, '1' and data json | '0' and error text
--   'fwd' (from another site, bridge only), stream sequence, message id, topic, data json,
--     expiry (Redis ms) or '', headers json or '', original sender, origin site, '1' for a request
--     (answered to the bridge) or '', then D and G as for 'msg'. A sequence at or below KEYS[10]
--     was delivered before and is skipped; KEYS[10] moves to the highest one delivered.
-- Inbox entries carry no timestamp field: their entry id is the Redis time they were written
-- (requeue.lua adds one when it moves an entry to another inbox).
-- Returns {'ok', routed, delivered, refused...} where refused is a flat list of (message number
--   1..M, error code, message) for messages refused and dead-lettered | {'again'} for a batch
--   already applied | {'stale', version} | {'fenced'} for a bridge that lost its lease |
--   {'unknown'} when the sender is not a member (nothing is written)
local version = redis.call('GET', KEYS[1]) or '0'
if version ~= ARGV[1] then
  return {'stale', version}
end
local sender = ARGV[2]
if not redis.call('ZSCORE', KEYS[2], sender) then
  return {'unknown'}
end
local bridge = ARGV[10] ~= ''
if bridge and redis.call('GET', KEYS[9]) ~= ARGV[10] then
  return {'fenced'}
end
if ARGV[9] ~= '' then
  if redis.call('HGET', KEYS[8], sender) == ARGV[9] then
    return {'again'}
  end
  redis.call('HSET', KEYS[8], sender, ARGV[9])
end
local maxlen, reject, dlmax = tonumber(ARGV[3]), ARGV[4] == 'reject', ARGV[5]
local max_payload, max_headers, max_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ninboxes = tonumber(ARGV[11])
local peers_at = 11
local applied, applied_max  -- the bridge's stream sequence: delivered before, and now
local now  -- Redis time in ms, read once and only for a message with a time to live

local before, added = {}, {}
local drops = {}
local routed, delivered = 0, 0
local refused = {}
local leader

-- one delivery of `fields` into inbox i, honouring the inbox bound
local function deliver(i, fields, id, topic, data)
  local key = KEYS[10 + i]
  if not before[i] then
    before[i] = redis.call('XLEN', key)
    added[i] = 0
  end
  local peer = ARGV[peers_at + i]
  if reject and before[i] + added[i] >= maxlen then
    drops[peer] = (drops[peer] or 0) + 1
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', dlmax, '*', 'reason', 'inbox_full',
      'message', 'the inbox of ' .. peer .. ' is full (SIDECAR_INBOX_MAXLEN)', 'stream', 'direct',
      'entry', id, 'sender', sender, 'peer', peer, 'topic', topic, 'raw', string.sub(data, 1, 4096))
    return
  end
  redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  added[i] = added[i] + 1
  delivered = delivered + 1
end

local function refuse(n, code, text, id, topic, data)
  refused[#refused + 1] = n
  refused[#refused + 1] = code
  refused[#refused + 1] = text
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', dlmax, '*', 'reason', code, 'message', text,
    'stream', 'direct', 'entry', id, 'sender', sender, 'topic', topic,
    'raw', string.sub(data, 1, 4096))
end

-- why a message may not go out, or nil: what the sidecar itself must hold (fencing, its limits,
-- its reserved topics); the mixin checks the full topic grammar and the JSON before it calls
local function check(id, topic, data, fence, ttl, headers)
  if #id == 0 or #id > 64 or string.find(id, '[^%w_.:%-]') then
    return 'bad_request', 'message id must be 1-64 letters, digits or _ . : -'
  end
  if #topic == 0 or #topic > 1024 or string.find(topic, '[%*>%s]') or string.sub(topic, 1, 8) == 'cluster.' then
    return 'invalid_topic', 'publish topic ' .. string.sub(topic, 1, 80) ..
      ' must be literal and not under cluster. (the sidecar\'s own events)'
  end
  if #data > max_payload then
    return 'payload_too_large', 'payload of ' .. #data .. ' bytes exceeds the ' .. max_payload .. '-byte limit'
  end
  if #headers > max_headers then
    return 'invalid_headers', 'headers of ' .. #headers .. ' bytes exceed the ' .. max_headers .. '-byte limit'
  end
  if ttl ~= '' then
    local ms = tonumber(ttl)
    if not ms or ms < 1 or ms > max_ttl or ms ~= math.floor(ms) then
      return 'bad_request', 'time to live must be 1 to ' .. max_ttl .. ' milliseconds'
    end
  end
  if fence ~= '' then
    leader = leader or redis.call('HMGET', KEYS[3], 'id', 'term')
    if leader[1] ~= sender or leader[2] ~= fence then
      return 'not_leader', 'fenced publish from ' .. sender .. ' with term ' .. fence ..
        ', but the leader is ' .. (leader[1] or 'nobody') .. ' at term ' .. (leader[2] or '0')
    end
  end
  return nil
end

local p = peers_at + ninboxes + 1
local count = tonumber(ARGV[p])
p = p + 1
for n = 1, count do
  if ARGV[p] == 'rep' then
    local request, i, ok = ARGV[p + 1], tonumber(ARGV[p + 2]), ARGV[p + 3]
    local body = ARGV[p + 4]
    p = p + 5
    if redis.call('ZSCORE', KEYS[2], ARGV[peers_at + i]) then
      local fields
      if ok == '1' then
        if #body > max_payload then
          refuse(n, 'payload_too_large', 'answer of ' .. #body .. ' bytes exceeds the ' ..
            max_payload .. '-byte limit', request, '', body)
          fields = {'k', 'rep', 'i', request, 't', '', 'd', 'null', 's', sender, 'ok', '0',
            'e', 'the answer was too large'}
        else
          fields = {'k', 'rep', 'i', request, 't', '', 'd', body, 's', sender, 'ok', '1'}
        end
      else
        fields = {'k', 'rep', 'i', request, 't', '', 'd', 'null', 's', sender, 'ok', '0',
          'e', string.sub(body, 1, 2000)}
      end
      deliver(i, fields, request, '', 'null')
      routed = routed + 1
    end
  else
    local fwd = ARGV[p] == 'fwd'
    local seq, original, origin, request  -- original sender, origin site
    if fwd then
      seq = tonumber(ARGV[p + 1])
      p = p + 1
    end
    local id, topic, data = ARGV[p + 1], ARGV[p + 2], ARGV[p + 3]
    local fence, ttl, headers, requester = ARGV[p + 4], ARGV[p + 5], ARGV[p + 6], ARGV[p + 7]
    if fwd then  -- expiry, headers, sender, site, request: no fence on another site's message
      ttl, headers, original, origin, request = ARGV[p + 4], ARGV[p + 5], ARGV[p + 6], ARGV[p + 7], ARGV[p + 8]
      fence, requester = '', ''
      p = p + 1
    end
    local nd = tonumber(ARGV[p + 8])
    local plain = p + 9
    p = plain + nd
    local ng = tonumber(ARGV[p])
    local groups = p + 1
    p = groups
    for _ = 1, ng do
      p = p + 3 + tonumber(ARGV[p + 2])
    end
    local skip, code, text = false, nil, nil
    if fwd and not (bridge and seq) then
      code, text = 'bad_request', 'only a site\'s bridge forwards messages from other sites'
    elseif fwd then
      applied = applied or tonumber(redis.call('GET', KEYS[10]) or '0')
      skip = seq <= applied or (applied_max ~= nil and seq <= applied_max)
      if not skip then applied_max = seq end
    end
    if not skip and not code then
      code, text = check(id, topic, data, fence, fwd and '' or ttl, headers)
    end
    if skip then  -- delivered before: a bridge that took over reads again what it cannot know
    elseif code then
      refuse(n, code, text, id, topic, data)
    else
      local fields = {'k', 'msg', 'i', id, 't', topic, 'd', data, 's', original or sender}
      if headers ~= '' then
        fields[#fields + 1] = 'h'
        fields[#fields + 1] = headers
      end
      if fwd then
        fields[#fields + 1] = 'o'
        fields[#fields + 1] = origin
        if ttl ~= '' then
          fields[#fields + 1] = 'x'
          fields[#fields + 1] = ttl
        end
        if request == '1' then
          fields[#fields + 1] = 'rt'
          fields[#fields + 1] = sender
        end
      elseif ttl ~= '' then
        if not now then
          local t = redis.call('TIME')
          now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        fields[#fields + 1] = 'x'
        fields[#fields + 1] = tostring(now + tonumber(ttl))
      end
      if requester ~= '' then
        fields[#fields + 1] = 'rt'
        fields[#fields + 1] = sender
      end
      local before_count = delivered
      for d = plain, plain + nd - 1 do
        deliver(tonumber(ARGV[d]), fields, id, topic, data)
      end
      local g = groups
      for _ = 1, ng do
        local queue, pattern, k = ARGV[g], ARGV[g + 1], tonumber(ARGV[g + 2])
        local turn = redis.call('HINCRBY', KEYS[7], queue .. ' ' .. pattern, 1)
        local queued = {unpack(fields)}
        queued[#queued + 1] = 'q'
        queued[#queued + 1] = queue
        queued[#queued + 1] = 'qp'
        queued[#queued + 1] = pattern
        deliver(tonumber(ARGV[g + 3 + (turn - 1) % k]), queued, id, topic, data)
        g = g + 3 + k
      end
      if nd + ng > 0 then
        routed = routed + 1
      elseif requester ~= '' then  -- nobody can answer: say so at once
        deliver(tonumber(requester), {'k', 'nr', 'i', id, 't', topic, 'd', 'null', 's', 'sidecar'},
          id, topic, 'null')
        delivered = before_count
      end
    end
  end
end

if not reject then  -- what the trim dropped, exactly (MAXLEN ~ trims whole nodes)
  for i, len in pairs(before) do
    if len + added[i] > maxlen then
      local dropped = len + added[i] - redis.call('XLEN', KEYS[10 + i])
      if dropped > 0 then
        local peer = ARGV[peers_at + i]
        drops[peer] = (drops[peer] or 0) + dropped
      end
    end
  end
end
for peer, dropped in pairs(drops) do
  redis.call('HINCRBY', KEYS[5], peer, dropped)
end
if #refused > 0 then
  redis.call('HINCRBY', KEYS[4], 'rejected', #refused / 3)
end
if applied_max then
  redis.call('SET', KEYS[10], applied_max)
end
local out = {'ok', routed, delivered}
for _, x in ipairs(refused) do
  out[#out + 1] = x
end
return out
