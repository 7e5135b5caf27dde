-- drop_inbox.lua: delete the inbox of a long-gone peer, atomically with the checks that it is gone,
-- so a reply written meanwhile (a peer registering again) is never deleted with it.
--
-- KEYS[1] the peer's inbox stream   KEYS[2] members zset
-- KEYS[3] last direct batch per sender (hash; optional: the gone peer's field goes with its inbox)
-- ARGV[1] peer id   ARGV[2] the peers' consumer group   ARGV[3] idle ms that count as gone
-- ARGV[4] floor ms: an inbox nobody ever read counts as gone when its last entry is older
-- Returns 1 deleted | 0 kept (a member, entries left, something pending, read recently, or an
-- inbox that never held an entry and has no reader: its age cannot be told, so it stays)
if redis.call('ZSCORE', KEYS[2], ARGV[1]) or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('XLEN', KEYS[1]) > 0 then
  return 0
end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[2])
local read = false
if ok then
  for _, c in ipairs(consumers) do
    for i = 1, #c, 2 do  -- name, pending, idle (and, from Redis 7.2, inactive) as field/value pairs
      if c[i] == 'pending' and tonumber(c[i + 1]) > 0 then
        return 0
      end
      if c[i] == 'idle' then
        read = true
        if tonumber(c[i + 1]) < tonumber(ARGV[3]) then
          return 0
        end
      end
    end
  end
end
if not read then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local last = '0-0'
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
  local ms = tonumber(string.match(last, '^(%d+)')) or 0
  if ms == 0 or ms >= tonumber(ARGV[4]) then
    return 0
  end
end
if KEYS[3] then
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return redis.call('DEL', KEYS[1])
