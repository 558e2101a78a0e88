"""The step's Lua script behind `RedisBlockPool`: one call runs a whole step.

The whole-pool scripts (init, load, seed, counts) are in `redis_lua_pool`, the lease's in `lease`.

Every script touches one pool's keys only. The step, init, load and seed scripts declare one
key, the pool's `meta` key, and derive the others from it: they share its hash tag, so a Redis
Cluster keeps them in the declared key's slot, on the node the script is routed to (checked on
a real 3-node cluster, tests/e2e/test_redis_cluster.py). Declaring every block table a step
touches would cost an argument per request per step and tell the cluster nothing more. The semantics are those
of `memory_pool.InMemoryBlockPool`, operation for operation; see `block_pool.StepOps` for
what each operation means. Blocks are moved in bulk (LPOP with a count, HMGET, multi-field
HSET, ZADD of many members) so that a step costs few commands inside the script as well.
"""

from __future__ import annotations

from pagedserve.scheduler.redis_lua_swap import SWAP_OPS_LUA

# Helpers shared by both scripts. Block ids are kept as strings, as Redis returns them.
PRELUDE = r"""
local meta = KEYS[1]
local P = string.sub(meta, 1, #meta - 4)
local FREE, REF, LRU, HASH, BHASH, REQS = P .. 'free', P .. 'ref', P .. 'lru', P .. 'hash', P .. 'bhash', P .. 'reqs'
local CFREE, CREF = P .. 'cfree', P .. 'cref'
local CHUNK = 1000
local tick = 0

-- Run `cmd key <args...>` over a long argument list in chunks (Lua's unpack has a stack limit);
-- `width` arguments form one item, so an item is never split across two calls.
local function bulk(cmd, key, args, width)
  local n = #args
  local step = CHUNK * width
  local out = {}
  for i = 1, n, step do
    local last = math.min(i + step - 1, n)
    local got = redis.call(cmd, key, unpack(args, i, last))
    if type(got) == 'table' then
      for j = 1, #got do out[#out + 1] = got[j] end
    end
  end
  return out
end

local function available()
  return redis.call('LLEN', FREE) + redis.call('ZCARD', LRU)
end

-- Take n blocks (caller checked availability): the free list's head first, then the least
-- recently used cached blocks, whose hashes are dropped. Each taken block gets ref_cnt 1.
local function take(n)
  local out = {}
  if n <= 0 then return out end
  local got = redis.call('LPOP', FREE, n)
  if got then
    for i = 1, #got do out[i] = got[i] end
  end
  if #out < n then
    local popped = redis.call('ZPOPMIN', LRU, n - #out)
    local evicted = {}
    for i = 1, #popped, 2 do
      out[#out + 1] = popped[i]
      evicted[#evicted + 1] = popped[i]
    end
    local hashes = bulk('HMGET', BHASH, evicted, 1)
    bulk('HDEL', HASH, hashes, 1)
    bulk('HDEL', BHASH, evicted, 1)
  end
  local pairs_ = {}
  for i = 1, #out do
    pairs_[#pairs_ + 1] = out[i]
    pairs_[#pairs_ + 1] = 1
  end
  bulk('HSET', REF, pairs_, 2)
  return out
end

-- Drop one reference from each block of a table, last block first. A block left with no
-- reference becomes cached-evictable when it has a hash (tail blocks get the older ticks, so
-- they are evicted first) or goes to the tail of the free list.
local function release(blocks)
  local n = #blocks
  if n == 0 then return end
  local refs = bulk('HMGET', REF, blocks, 1)
  local hashed = bulk('HMGET', BHASH, blocks, 1)
  local keep, gone, to_free, to_lru = {}, {}, {}, {}
  for i = n, 1, -1 do
    local b = blocks[i]
    local r = (tonumber(refs[i]) or 0) - 1
    if r > 0 then
      keep[#keep + 1] = b
      keep[#keep + 1] = r
    else
      gone[#gone + 1] = b
      if hashed[i] then
        tick = tick + 1
        to_lru[#to_lru + 1] = string.format('%d', tick)
        to_lru[#to_lru + 1] = b
      else
        to_free[#to_free + 1] = b
      end
    end
  end
  if #keep > 0 then bulk('HSET', REF, keep, 2) end
  if #gone > 0 then bulk('HDEL', REF, gone, 1) end
  if #to_free > 0 then bulk('RPUSH', FREE, to_free, 1) end
  if #to_lru > 0 then bulk('ZADD', LRU, to_lru, 2) end
end

-- The same for a CPU table (swap space): a CPU block left with no reference goes to the tail
-- of the CPU free list.
local function release_cpu(blocks)
  local n = #blocks
  if n == 0 then return end
  local refs = bulk('HMGET', CREF, blocks, 1)
  local left = {}
  local keep, gone = {}, {}
  for i = n, 1, -1 do
    local b = blocks[i]
    local r = (left[b] or tonumber(refs[i]) or 0) - 1
    left[b] = r
    if r > 0 then
      keep[#keep + 1] = b
      keep[#keep + 1] = r
    else
      gone[#gone + 1] = b
    end
  end
  if #keep > 0 then bulk('HSET', CREF, keep, 2) end
  if #gone > 0 then bulk('HDEL', CREF, gone, 1); bulk('RPUSH', CFREE, gone, 1) end
end

local function free_gpu_table(rid)
  local tkey = P .. 'table:' .. rid
  release(redis.call('LRANGE', tkey, 0, -1))
  redis.call('DEL', tkey)
end

local function free_cpu_table(rid)
  local tkey = P .. 'ctable:' .. rid
  release_cpu(redis.call('LRANGE', tkey, 0, -1))
  redis.call('DEL', tkey)
end

local function free_table(rid)
  free_gpu_table(rid)
  free_cpu_table(rid)
end
"""

STEP_LUA = (
    PRELUDE
    + r"""
local info = redis.call('HMGET', meta, 'block_size', 'tick', 'fence')
if ARGV[3] ~= '0' and info[3] ~= ARGV[3] then
  return redis.error_reply('PAGEDSERVE_FENCED fencing token ' .. ARGV[3] .. ' is stale; the pool is at '
    .. tostring(info[3]))
end
if not info[1] then
  return redis.error_reply('PAGEDSERVE_NOPOOL pool not initialized: ' .. meta)
end
local bs = tonumber(info[1])
tick = tonumber(info[2]) or 0
local ops = cjson.decode(ARGV[1])
local results = {}

-- Progress records first (see block_pool.StepOps.update): "rid US status US ncomp US outputs RS".
for rid, status, ncomp, outs in string.gmatch(ARGV[2], '([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\30]*)\30') do
  redis.call('HSET', P .. 'req:' .. rid, 'status', status, 'num_computed_tokens', ncomp)
  if outs ~= '' then redis.call('APPEND', P .. 'out:' .. rid, outs) end
end

local function to_numbers(blocks)
  local out = {}
  for i = 1, #blocks do out[i] = tonumber(blocks[i]) end
  return out
end

local function op_alloc(rid, n)
  if n > available() then return {0, {}} end
  local blocks = take(n)
  if #blocks > 0 then
    bulk('RPUSH', P .. 'table:' .. rid, blocks, 1)
    redis.call('SADD', REQS, rid)
  end
  return {1, to_numbers(blocks)}
end

local function op_admit(rid, num_tokens, num_new, chain, shared)
  local tkey = P .. 'table:' .. rid
  if redis.call('LLEN', tkey) > 0 then return {0, 0, {}} end
  shared = shared or {}
  local hits, seen, parent = {}, {}, ''
  if #chain > 0 then
    local wanted = {}
    for i = 1, #chain do wanted[i] = chain[i][1] end
    local stored = bulk('HMGET', HASH, wanted, 1)
    for i = 1, #chain do
      local v = stored[i]
      if not v then break end
      local p1 = string.find(v, '|', 1, true)
      local p2 = string.find(v, '|', p1 + 1, true)
      local b = string.sub(v, 1, p1 - 1)
      if seen[b] or string.sub(v, p1 + 1, p2 - 1) ~= parent or string.sub(v, p2 + 1) ~= chain[i][2] then
        break
      end
      seen[b] = true
      hits[#hits + 1] = b
      parent = chain[i][1]
    end
  end
  -- Blocks a planned step computes, shared by name (see pending_prefix.py): each must be in use
  -- (have a reference) and appear once, after the hits.
  local cached = #hits
  for i = 1, #shared do
    local b = tostring(shared[i])
    if seen[b] then return {0, 0, {}} end
    seen[b] = true
    hits[#hits + 1] = b
  end
  local refs = bulk('HMGET', REF, hits, 1)
  for i = cached + 1, #hits do
    if not refs[i] then return {0, 0, {}} end
  end
  local from_lru = {}
  local bump = {}
  for i = 1, #hits do
    if refs[i] then
      bump[#bump + 1] = hits[i]
      bump[#bump + 1] = tonumber(refs[i]) + 1
    else
      from_lru[#from_lru + 1] = hits[i]
      bump[#bump + 1] = hits[i]
      bump[#bump + 1] = 1
    end
  end
  local covered = math.min(num_tokens, #hits * bs + num_new)
  local fresh = math.ceil(covered / bs) - #hits
  if fresh < 0 then fresh = 0 end
  if fresh + #from_lru > available() then return {0, 0, {}} end
  if #from_lru > 0 then bulk('ZREM', LRU, from_lru, 1) end
  if #bump > 0 then bulk('HSET', REF, bump, 2) end
  local table_ = {}
  for i = 1, #hits do table_[i] = hits[i] end
  local new = take(fresh)
  for i = 1, #new do table_[#table_ + 1] = new[i] end
  if #table_ > 0 then
    bulk('RPUSH', tkey, table_, 1)
    redis.call('SADD', REQS, rid)
  end
  return {1, #hits, to_numbers(table_)}
end

local function op_fork(parent, child)
  -- A table never holds a block twice, so a child that already has one is left alone.
  if parent == child or redis.call('EXISTS', P .. 'table:' .. child) == 1 then return end
  local blocks = redis.call('LRANGE', P .. 'table:' .. parent, 0, -1)
  if #blocks == 0 then return end
  local refs = bulk('HMGET', REF, blocks, 1)
  local bump = {}
  for i = 1, #blocks do
    bump[#bump + 1] = blocks[i]
    bump[#bump + 1] = (tonumber(refs[i]) or 0) + 1
  end
  bulk('HSET', REF, bump, 2)
  bulk('RPUSH', P .. 'table:' .. child, blocks, 1)
  redis.call('SADD', REQS, child)
end

local function op_cow(rid)
  local tkey = P .. 'table:' .. rid
  local last = redis.call('LINDEX', tkey, -1)
  if not last then return {1, -1, -1} end
  local r = tonumber(redis.call('HGET', REF, last)) or 0
  if r <= 1 then return {1, -1, -1} end
  if available() < 1 then return {0, -1, -1} end
  local dst = take(1)[1]
  redis.call('HSET', REF, last, r - 1)
  redis.call('LSET', tkey, -1, dst)
  return {1, tonumber(last), tonumber(dst)}
end

local function op_reg(rid, index, h, parent, tokens)
  local b = redis.call('LINDEX', P .. 'table:' .. rid, index)
  if not b then return end
  if redis.call('HEXISTS', BHASH, b) == 1 or redis.call('HEXISTS', HASH, h) == 1 then return end
  redis.call('HSET', HASH, h, b .. '|' .. parent .. '|' .. tokens)
  redis.call('HSET', BHASH, b, h)
end

"""
    + SWAP_OPS_LUA
    + r"""
for i = 1, #ops do
  local op = ops[i]
  local code, rid = op[1], op[2]
  local res = 0
  if code == 'alloc' then
    res = op_alloc(rid, op[3])
  elseif code == 'reg' then
    op_reg(rid, op[3], op[4], op[5], op[6])
  elseif code == 'free' then
    free_table(rid)
    if redis.call('EXISTS', P .. 'req:' .. rid) == 0 then redis.call('SREM', REQS, rid) end
  elseif code == 'admit' then
    res = op_admit(rid, op[3], op[4], op[5], op[6])
  elseif code == 'cow' then
    res = op_cow(rid)
  elseif code == 'fork' then
    op_fork(rid, op[3])
  elseif code == 'swapout' then
    res = op_swapout(rid, op[3])
  elseif code == 'swapin' then
    res = op_swapin(rid)
  elseif code == 'save' then
    redis.call('HSET', P .. 'req:' .. rid, 'prompt', op[3], 'params', op[4], 'priority', op[5],
      'status', op[6], 'num_computed_tokens', op[7])
    redis.call('SET', P .. 'out:' .. rid, op[8])
    redis.call('SADD', REQS, rid)
  elseif code == 'drop' then
    free_table(rid)
    redis.call('DEL', P .. 'req:' .. rid, P .. 'out:' .. rid)
    redis.call('SREM', REQS, rid)
  else
    return redis.error_reply('PAGEDSERVE_BADOP unknown operation ' .. tostring(code))
  end
  results[i] = res
end

redis.call('HSET', meta, 'tick', string.format('%d', tick))
local nfree, ncached = redis.call('LLEN', FREE), redis.call('ZCARD', LRU)
-- The pool's load for the registry (see common/pool_registry.py): "running,waiting,tokens,ms".
if ARGV[4] and ARGV[4] ~= '' then
  local l = {}
  for v in string.gmatch(ARGV[4], '[^,]+') do l[#l + 1] = v end
  redis.call('HSET', P .. 'load', 'running', l[1], 'waiting', l[2], 'tokens', l[3], 'ms', l[4],
    'available', nfree + ncached)
end
return cjson.encode({r = results, f = nfree, c = ncached, u = redis.call('HLEN', REF)})
"""
)
